//! Connections to the cluster's beanstalkd servers, this host's and the others'.
//!
//! One lazily opened connection per address, shared behind a lock (puts and peeks are
//! short). A connection that fails is dropped and opened again on the next call, so a
//! host whose beanstalkd is down costs one quick refusal per call, never a hang: every
//! call has a time limit.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use beanstalk::{Client, Options, PutParams};
use tokio::sync::Mutex;

use crate::message::{self, tubes, Envelope, Message};

/// Why a call to a peer failed.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// beanstalkd failed or could not be reached.
    #[error("beanstalkd at {addr}: {source}")]
    Queue {
        /// The server.
        addr: String,
        /// Why.
        #[source]
        source: beanstalk::Error,
    },
    /// The inventory there is not one this host can read.
    #[error("the inventory at {addr} cannot be read: {reason}")]
    BadInventory {
        /// The server.
        addr: String,
        /// Why.
        reason: String,
    },
}

impl PeerError {
    /// True when nothing was sent: the connection could not even be opened, so a put
    /// certainly did not happen.
    pub fn nothing_sent(&self) -> bool {
        matches!(
            self,
            PeerError::Queue {
                source: beanstalk::Error::Connect { .. },
                ..
            }
        )
    }
}

/// The connections.
#[derive(Debug, Default)]
pub struct Peers {
    conns: Mutex<HashMap<String, Arc<Mutex<Option<Client>>>>>,
}

fn options() -> Options {
    Options {
        call_timeout: Some(Duration::from_secs(5)),
        connect_timeout: Duration::from_secs(2),
    }
}

impl Peers {
    /// No connections yet.
    pub fn new() -> Peers {
        Peers::default()
    }

    async fn slot(&self, addr: &str) -> Arc<Mutex<Option<Client>>> {
        let mut conns = self.conns.lock().await;
        conns.entry(addr.to_string()).or_default().clone()
    }

    /// Runs `f` on the connection to `addr`, opening it if needed and dropping it after
    /// a failure.
    async fn with<T, F>(&self, addr: &str, f: F) -> Result<T, PeerError>
    where
        F: for<'c> FnOnce(
            &'c mut Client,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<T, beanstalk::Error>> + Send + 'c>,
        >,
    {
        let slot = self.slot(addr).await;
        let mut guard = slot.lock().await;
        let queue = |source| PeerError::Queue {
            addr: addr.to_string(),
            source,
        };
        if guard.is_none() {
            *guard = Some(Client::connect_with(addr, options()).await.map_err(queue)?);
        }
        let client = guard.as_mut().expect("connected above");
        let result = f(client).await;
        if result.as_ref().is_err_and(|e| e.is_disconnect()) {
            *guard = None;
        }
        result.map_err(queue)
    }

    /// Puts `envelope` on `tube` at `addr`.
    pub async fn put(
        &self,
        addr: &str,
        tube: &'static str,
        envelope: &Envelope,
        params: PutParams,
    ) -> Result<u64, PeerError> {
        let body = message::encode(envelope);
        self.with(addr, move |c| {
            Box::pin(async move {
                c.use_tube(tube).await?;
                c.put(&body, params).await
            })
        })
        .await
    }

    /// Reads the inventory published at `addr`, host `host`'s beanstalkd (the oldest
    /// ready one if several are there for a moment), and how long the server took to
    /// answer. With `verify`, an inventory whose signature does not verify under the keys,
    /// that is not addressed as `host`'s inventory, or that is older than the window
    /// (seconds), is an error.
    pub async fn inventory(
        &self,
        addr: &str,
        host: &str,
        verify: Option<(&crate::auth::Keys, u64)>,
    ) -> Result<(Option<message::Inventory>, Duration), PeerError> {
        let started = Instant::now();
        let job = self
            .with(addr, |c| {
                Box::pin(async move {
                    c.use_tube(tubes::INVENTORY).await?;
                    c.peek_ready().await
                })
            })
            .await?;
        let took = started.elapsed();
        let Some(job) = job else {
            return Ok((None, took));
        };
        let decoded = message::decode(&job.body);
        if let (Ok(env), Some((keys, window))) = (&decoded, verify) {
            if let Err(e) = keys.verify(env, host, tubes::INVENTORY, message::now(), window) {
                return Err(PeerError::BadInventory {
                    addr: addr.to_string(),
                    reason: e.to_string(),
                });
            }
        }
        match decoded {
            Ok(Envelope {
                body: Message::Inventory(inv),
                ..
            }) => Ok((Some(inv), took)),
            Ok(other) => Err(PeerError::BadInventory {
                addr: addr.to_string(),
                reason: format!("a `{}` message in the inventory tube", other.body.kind()),
            }),
            Err(e) => Err(PeerError::BadInventory {
                addr: addr.to_string(),
                reason: e.to_string(),
            }),
        }
    }

    /// `stats-tube` of `tube` at `addr`; `None` for a tube nobody has used yet.
    pub async fn tube_stats(
        &self,
        addr: &str,
        tube: &'static str,
    ) -> Result<Option<beanstalk::TubeStats>, PeerError> {
        self.with(addr, move |c| {
            Box::pin(async move {
                match c.stats_tube(tube).await {
                    Err(beanstalk::Error::NotFound) => Ok(None),
                    other => other.map(Some),
                }
            })
        })
        .await
    }

    /// Replaces the inventory published at `addr` with `envelope`: puts the new one,
    /// then deletes every older one, so a reader always finds one.
    pub async fn publish_inventory(
        &self,
        addr: &str,
        envelope: &Envelope,
    ) -> Result<(), PeerError> {
        let body = message::encode(envelope);
        self.with(addr, move |c| {
            Box::pin(async move {
                c.use_tube(tubes::INVENTORY).await?;
                let id = c
                    .put(
                        &body,
                        PutParams {
                            pri: 0,
                            delay: 0,
                            ttr: 60,
                        },
                    )
                    .await?;
                // peek-ready answers the oldest of equal priority: delete until ours.
                while let Some(old) = c.peek_ready().await? {
                    if old.id == id {
                        break;
                    }
                    match c.delete(old.id).await {
                        Ok(()) | Err(beanstalk::Error::NotFound) => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(())
            })
        })
        .await
    }
}
