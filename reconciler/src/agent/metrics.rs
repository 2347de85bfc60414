//! The agent's HTTP side, served with axum on the agent's tokio runtime when the
//! config sets `http` (loopback unless told otherwise):
//! - `/metrics`: the Prometheus metrics ([`super::registry::Metrics`]), OpenMetrics text;
//! - `/healthz`: `ok`, or HTTP 503 and every reason why not ([`super::health`]);
//! - `/`: a read-only status page that refreshes itself from `/status.json`;
//! - `/status.json`: the cluster as `flotilla status` shows it, this agent's view of
//!   its desired repo and last plan, and its recent events.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::message::{self, tubes};

pub use super::series::{Counter, Gauge};

use super::health::{self, Inputs};
use super::status::{self, Verify};
use super::{HostsFile, Shared};

/// How many of the latest events the status page shows.
const RECENT_EVENTS: usize = 25;

/// The metrics page.
pub fn render(shared: &Shared) -> String {
    let applied = shared.local().applied_commit.clone();
    let desired = shared.snapshot().and_then(|s| s.commit.clone());
    shared.metrics.encode(
        message::now(),
        &shared.cluster_id(),
        applied.as_deref(),
        desired.as_deref(),
        &shared.backend.invocations(),
    )
}

/// Healthy, or why not: reads what the loops recorded and asks this host's beanstalkd.
pub async fn health(shared: &Shared) -> Result<(), Vec<String>> {
    let beanstalkd = match shared.own_addr() {
        None => Err("its address is not known yet".to_string()),
        Some(addr) => match tokio::time::timeout(
            Duration::from_secs(3),
            shared.peers.tube_stats(&addr, tubes::CONTROL),
        )
        .await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("{addr}: {e}")),
            Err(_) => Err(format!("{addr}: no answer within 3s")),
        },
    };
    let seen = shared.seen().clone();
    health::assess(&Inputs {
        seen: &seen,
        loaded: shared.snapshot().is_some(),
        beanstalkd,
        poll: super::poll_interval(shared),
        now: message::now(),
    })
}

/// Serves on `addr`, as a task of the current tokio runtime. Binding happens now, so
/// an address in use is reported to the caller.
pub fn serve(shared: Arc<Shared>, addr: SocketAddr) -> std::io::Result<()> {
    let std_listener = std::net::TcpListener::bind(addr)?;
    std_listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(std_listener)?;
    let app = Router::new()
        .route("/", get(page))
        .route("/status.json", get(status_json))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(shared.clone());
    let mut stop = shared.stop.subscribe();
    tokio::spawn(async move {
        let server = axum::serve(listener, app)
            .with_graceful_shutdown(async move { super::stopped(&mut stop).await });
        if let Err(e) = server.await {
            tracing::warn!(error = %e, "the HTTP server stopped");
        }
    });
    Ok(())
}

type State = axum::extract::State<Arc<Shared>>;

async fn metrics(axum::extract::State(shared): State) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        render(&shared),
    )
        .into_response()
}

async fn healthz(axum::extract::State(shared): State) -> Response {
    match health(&shared).await {
        Ok(()) => (StatusCode::OK, "ok\n".to_string()).into_response(),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("unhealthy: {}\n", why.join("; ")),
        )
            .into_response(),
    }
}

async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // Everything is inline; nothing is loaded from elsewhere.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; style-src 'unsafe-inline'; script-src 'unsafe-inline'",
            ),
        ],
        include_str!("status_page.html"),
    )
        .into_response()
}

/// What the status page shows.
#[derive(serde::Serialize)]
struct PageData {
    host: String,
    generated_at: u64,
    health: Result<(), Vec<String>>,
    seen: health::Seen,
    cluster: Option<status::ClusterStatus>,
    cluster_error: Option<String>,
    /// The owner of each desired VM under the last good desired state.
    owners: std::collections::BTreeMap<String, String>,
    events: Vec<super::events::Event>,
}

async fn status_json(axum::extract::State(shared): State) -> Response {
    let hosts = std::fs::read(shared.cfg.state_dir.join(HostsFile::NAME))
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice::<HostsFile>(&b).map_err(|e| e.to_string()));
    let (cluster, cluster_error) = match hosts {
        Ok(h) => {
            let window = shared.cfg.message_window.0.as_secs();
            let (st, _) = status::gather(&h, Verify::With(&shared.keys, window)).await;
            (Some(st), None)
        }
        Err(e) => (None, Some(format!("no hosts file yet: {e}"))),
    };
    let path = shared.events.path().to_path_buf();
    let events = tokio::task::spawn_blocking(move || super::events::read(&path))
        .await
        .ok()
        .and_then(Result::ok)
        .map(|mut all| {
            let from = all.len().saturating_sub(RECENT_EVENTS);
            all.split_off(from)
        })
        .unwrap_or_default();
    let owners = shared
        .snapshot()
        .map(|snap| {
            let hosts: Vec<&str> = snap.cluster.hosts.keys().map(String::as_str).collect();
            snap.vms
                .values()
                .filter_map(|v| {
                    let o = crate::owner::owner(&v.name, v.pin(), hosts.iter().copied())?;
                    Some((v.name.clone(), o.to_string()))
                })
                .collect()
        })
        .unwrap_or_default();
    let data = PageData {
        owners,
        host: shared.me().to_string(),
        generated_at: message::now(),
        health: health(&shared).await,
        seen: shared.seen().clone(),
        cluster,
        cluster_error,
        events,
    };
    match serde_json::to_string(&data) {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}
