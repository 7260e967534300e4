//! A TCP proxy in front of the shared broker whose connections a test can cut, to lose
//! the connection without touching the broker every other test uses.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

/// Forwards every connection to `upstream` until dropped; [`cut`](Proxy::cut) drops them.
pub struct Proxy {
    pub port: u16,
    links: Arc<Mutex<Vec<AbortHandle>>>,
    refusing: Arc<AtomicBool>,
    listener: AbortHandle,
}

impl Proxy {
    /// Listens on a free local port, forwarding to `upstream` (`host:port`).
    pub async fn start(upstream: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let links: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let upstream = upstream.to_owned();
        let accepted = links.clone();
        let refusing: Arc<AtomicBool> = Arc::default();
        let refuse = refusing.clone();
        let listener = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if refuse.load(Ordering::Acquire) {
                    continue;
                }
                let upstream = upstream.clone();
                let link = tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                let mut links = accepted.lock().unwrap();
                links.retain(|link| !link.is_finished());
                links.push(link.abort_handle());
            }
        })
        .abort_handle();
        Proxy {
            port,
            links,
            refusing,
            listener,
        }
    }

    /// Drops every open connection at once, as a network failure would; new ones are
    /// still accepted.
    pub fn cut(&self) -> usize {
        let links = std::mem::take(&mut *self.links.lock().unwrap());
        for link in &links {
            link.abort();
        }
        links.len()
    }

    /// An outage: cuts every connection and refuses new ones until [`resume`](Proxy::resume).
    pub fn pause(&self) {
        self.refusing.store(true, Ordering::Release);
        self.cut();
    }

    /// Ends an outage.
    pub fn resume(&self) {
        self.refusing.store(false, Ordering::Release);
    }

    /// `url` (an AMQP URI) with its host and port replaced by this proxy's.
    pub fn url(&self, url: &str) -> String {
        let (before, address, after) = split_address(url);
        let _ = address;
        format!("{before}127.0.0.1:{}{after}", self.port)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.listener.abort();
        self.cut();
    }
}

/// Splits an AMQP URI around its `host:port`.
/// The shared broker's `host:port`.
pub fn upstream() -> String {
    let url = super::amqp_url();
    let address = split_address(&url).1;
    if address.contains(':') {
        address.to_owned()
    } else {
        format!("{address}:5672")
    }
}

pub fn split_address(url: &str) -> (&str, &str, &str) {
    let start = url
        .rfind('@')
        .map_or_else(|| url.find("://").map_or(0, |i| i + 3), |i| i + 1);
    let end = url[start..].find('/').map_or(url.len(), |i| start + i);
    (&url[..start], &url[start..end], &url[end..])
}
