//! The client's request body as the gateway reads it: with `server.body_timeout` between frames, a
//! count of the bytes received (for the access log), and a record of how it failed, so that a
//! failure the upstream hop sees is answered as the client's fault (408, 400), not the upstream's.
//!
//! Without the timeout, a client that declares `Content-Length: 100` and sends one byte holds its
//! connection (and an HTTP/2 stream keeps its connection "in flight") for ever: 200 of them took
//! every `max_connections` slot.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

/// How a request body ended, as far as the gateway could tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFault {
    /// No bytes for `body_timeout`: 408.
    Timeout,
    /// The body could not be read (malformed chunked encoding, a stream reset, a closed
    /// connection): 400 (or nobody to answer).
    Unreadable,
}

/// What the request path learns from the body while someone else (hyper's client) reads it.
#[derive(Debug, Default)]
pub struct BodyStats {
    bytes: AtomicU64,
    /// 0: none; 1: timeout; 2: unreadable.
    fault: AtomicU8,
}

impl BodyStats {
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    pub fn fault(&self) -> Option<BodyFault> {
        match self.fault.load(Ordering::Relaxed) {
            1 => Some(BodyFault::Timeout),
            2 => Some(BodyFault::Unreadable),
            _ => None,
        }
    }

    fn set_fault(&self, f: BodyFault) {
        let v = match f {
            BodyFault::Timeout => 1,
            BodyFault::Unreadable => 2,
        };
        let _ = self.fault.compare_exchange(0, v, Ordering::Relaxed, Ordering::Relaxed);
    }
}

/// The error a [`ClientBody`] yields; the upstream hop sees it as its request body failing.
#[derive(Debug)]
pub enum ClientBodyError {
    Timeout(Duration),
    Read(hyper::Error),
}

impl fmt::Display for ClientBodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientBodyError::Timeout(d) => write!(f, "no request body bytes for {d:?}"),
            ClientBodyError::Read(e) => write!(f, "the request body could not be read: {e}"),
        }
    }
}

impl std::error::Error for ClientBodyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ClientBodyError::Timeout(_) => None,
            ClientBodyError::Read(e) => Some(e),
        }
    }
}

pub struct ClientBody {
    inner: Incoming,
    timeout: Duration,
    /// Armed while waiting for the next frame; allocated only when a wait happens.
    sleep: Option<Pin<Box<Sleep>>>,
    waiting: bool,
    /// None for a request that has no body: nothing to count, and no allocation per request.
    stats: Option<Arc<BodyStats>>,
    /// Held until the body has been read to its end (or dropped): see [`BodyGuard`].
    guard: Option<BodyGuard>,
}

/// Whatever the connection needs to hold while a request body is still being read (the server
/// counts the request as in flight until then, so the connection is neither idle nor parked while
/// hyper is still reading the body, even after the response has been sent). Put in the request's
/// extensions by the connection, taken by [`ClientBody::new`].
#[derive(Clone)]
pub struct BodyGuard(pub Arc<dyn Send + Sync>);

impl ClientBody {
    pub fn new(inner: Incoming, timeout: Duration, guard: Option<BodyGuard>) -> Self {
        let stats = (!inner.is_end_stream()).then(Arc::default);
        ClientBody {
            inner,
            timeout,
            sleep: None,
            waiting: false,
            stats,
            guard,
        }
    }

    /// What was read and how it went; `None` when the request has no body.
    pub fn stats(&self) -> Option<&Arc<BodyStats>> {
        self.stats.as_ref()
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = ClientBodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, ClientBodyError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.waiting = false;
                if let Some(data) = frame.data_ref()
                    && let Some(stats) = &this.stats
                {
                    stats.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                if let Some(stats) = &this.stats {
                    stats.set_fault(BodyFault::Unreadable);
                }
                this.guard = None;
                Poll::Ready(Some(Err(ClientBodyError::Read(e))))
            }
            Poll::Ready(None) => {
                this.guard = None;
                Poll::Ready(None)
            }
            Poll::Pending => {
                let deadline = Instant::now() + this.timeout;
                let sleep = match &mut this.sleep {
                    Some(s) => {
                        if !this.waiting {
                            s.as_mut().reset(deadline);
                        }
                        s
                    }
                    None => this.sleep.insert(Box::pin(tokio::time::sleep_until(deadline))),
                };
                this.waiting = true;
                ready!(sleep.as_mut().poll(cx));
                if let Some(stats) = &this.stats {
                    stats.set_fault(BodyFault::Timeout);
                }
                Poll::Ready(Some(Err(ClientBodyError::Timeout(this.timeout))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
