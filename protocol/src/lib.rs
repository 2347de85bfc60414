//! flotilla's wire protocol: every message between hosts ([`message`]), their
//! signing ([`auth`]), the runtime's types they carry (the agent's `identity`, its
//! `events`) and the create chain's rule on a create job ([`placement`]).

pub mod auth;
pub mod events;
pub mod identity;
pub mod message;
pub mod placement;
