//! The Unix stream that carries frames between msghandler and msgserver, registered
//! with tokio's reactor for reading only.
//!
//! Why not `tokio::net::UnixStream`: tokio registers a socket for both directions,
//! and on a Unix stream socket Linux reports "writable" to every epoll watching it
//! each time the peer consumes data (`unix_write_space` runs whenever a sent buffer
//! is freed; unlike TCP it does not check that anyone ever found the socket full).
//! With request/reply traffic that is one useless wake-up, often a context switch,
//! per frame the peer reads, on both sides. Here the socket is registered for
//! readability only; writes go straight to the socket, and only a write that finds
//! it full registers a duplicate of the descriptor for writability, dropped again
//! as soon as the write gets through.

use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use nix::libc;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

/// A connected Unix stream socket; [`Link::into_split`] gives its two directions.
pub struct Link {
    fd: Arc<AsyncFd<OwnedFd>>,
}

impl Link {
    /// Takes over a connected socket. Must be called inside a tokio runtime.
    pub fn new(stream: std::os::unix::net::UnixStream) -> io::Result<Link> {
        stream.set_nonblocking(true)?;
        let fd = register(OwnedFd::from(stream), Interest::READABLE)?;
        Ok(Link { fd: Arc::new(fd) })
    }

    /// Takes over a socket accepted or connected by tokio.
    pub fn from_tokio(stream: tokio::net::UnixStream) -> io::Result<Link> {
        Link::new(stream.into_std()?)
    }

    /// Connects to the socket at `path` without blocking the runtime.
    pub async fn connect(path: &Path) -> io::Result<Link> {
        Link::from_tokio(tokio::net::UnixStream::connect(path).await?)
    }

    pub fn into_split(self) -> (LinkReader, LinkWriter) {
        (
            LinkReader {
                fd: self.fd.clone(),
            },
            LinkWriter {
                fd: self.fd,
                full: None,
            },
        )
    }
}

/// The reading direction of a [`Link`].
pub struct LinkReader {
    fd: Arc<AsyncFd<OwnedFd>>,
}

impl AsyncRead for LinkReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            // SAFETY: recv only writes into the unfilled part, and only the `n`
            // bytes it reports are marked initialised.
            let unfilled = unsafe { buf.unfilled_mut() };
            let room = unfilled.len();
            let read = guard.try_io(|fd| {
                result(unsafe {
                    libc::recv(
                        fd.as_raw_fd(),
                        unfilled.as_mut_ptr().cast(),
                        unfilled.len(),
                        0,
                    )
                })
            });
            match read {
                Ok(Ok(n)) => {
                    // A short read emptied the socket: as tokio's own streams do,
                    // forget the readiness now rather than pay a read that would
                    // only say EAGAIN. (The guard keeps any edge that came since.)
                    if n > 0 && n < room {
                        guard.clear_ready();
                    }
                    unsafe { buf.assume_init(n) };
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

/// The writing direction of a [`Link`]. Dropping it shuts the socket down for
/// writing, as tokio's `OwnedWriteHalf` does, so the peer reads end-of-file.
pub struct LinkWriter {
    fd: Arc<AsyncFd<OwnedFd>>,
    /// Registered for writability while a write waits for room in a full socket.
    full: Option<AsyncFd<OwnedFd>>,
}

impl LinkWriter {
    fn raw(&self) -> RawFd {
        self.fd.get_ref().as_raw_fd()
    }

    fn poll_io(
        &mut self,
        cx: &mut Context<'_>,
        op: impl Fn(RawFd) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        let fd = self.raw();
        loop {
            if let Some(full) = &self.full {
                let mut guard = ready!(full.poll_write_ready(cx))?;
                match guard.try_io(|_| op(fd)) {
                    Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Ok(done) => {
                        drop(guard);
                        self.full = None;
                        return Poll::Ready(done);
                    }
                    Err(_would_block) => continue,
                }
            }
            match op(fd) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Registering reports the socket's present state, so room made
                    // between the failed write and this is not missed.
                    let dup = self.fd.get_ref().as_fd().try_clone_to_owned()?;
                    self.full = Some(register(dup, Interest::WRITABLE)?);
                }
                done => return Poll::Ready(done),
            }
        }
    }
}

fn register(fd: OwnedFd, interest: Interest) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd stays open, and names the same file, until it is dropped,
    // which only the AsyncFd that owns it can do.
    unsafe { AsyncFd::register_with_interest(fd, interest) }.map_err(|e| e.into_parts().1)
}

/// A send or receive system call's return value as a byte count or its error.
fn result(n: isize) -> io::Result<usize> {
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

impl AsyncWrite for LinkWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_io(cx, |fd| {
            // MSG_NOSIGNAL: a peer that has gone is an EPIPE error, never a signal.
            result(unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL) })
        })
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_io(cx, |fd| {
            // SAFETY: IoSlice is guaranteed to be ABI-compatible with iovec.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
            msg.msg_iovlen = bufs.len().min(libc::UIO_MAXIOV as usize) as _;
            result(unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL) })
        })
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Nothing is buffered here: a write that returned is in the kernel.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(shutdown_write(self.raw()))
    }
}

fn shutdown_write(fd: RawFd) -> io::Result<()> {
    match unsafe { libc::shutdown(fd, libc::SHUT_WR) } {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

impl Drop for LinkWriter {
    fn drop(&mut self) {
        let _ = shutdown_write(self.raw());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn pair() -> (Link, Link) {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        (Link::new(a).unwrap(), Link::new(b).unwrap())
    }

    #[tokio::test]
    async fn bytes_cross_both_ways_and_dropping_the_writer_is_end_of_file() {
        let (a, b) = pair();
        let (mut a_read, mut a_write) = a.into_split();
        let (mut b_read, mut b_write) = b.into_split();
        a_write.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        b_read.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        let written = b_write
            .write_vectored(&[IoSlice::new(b"po"), IoSlice::new(b"ng")])
            .await
            .unwrap();
        assert_eq!(written, 4, "both slices go out in one call");
        a_read.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"pong");
        drop(a_write);
        let mut rest = Vec::new();
        assert_eq!(b_read.read_to_end(&mut rest).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn a_writer_that_fills_the_socket_waits_for_room_and_loses_nothing() {
        let (a, b) = pair();
        let (_a_read, mut a_write) = a.into_split();
        let (mut b_read, _b_write) = b.into_split();
        // Far more than a Unix socket buffers, so the writer must find it full,
        // wait for writability and carry on once the reader drains it.
        let sent: Vec<u8> = (0..8 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
        let expected = sent.clone();
        let writer = tokio::spawn(async move {
            a_write.write_all(&sent).await.unwrap();
            assert!(
                a_write.full.is_none(),
                "the writability registration outlived the wait"
            );
        });
        let mut got = vec![0u8; expected.len()];
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        b_read.read_exact(&mut got).await.unwrap();
        writer.await.unwrap();
        assert!(got == expected, "bytes were lost or reordered");
    }

    #[tokio::test]
    async fn writing_to_a_closed_peer_is_an_error_not_a_signal() {
        let (a, b) = pair();
        let (_a_read, mut a_write) = a.into_split();
        drop(b);
        let err = a_write.write_all(b"anyone?").await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    }
}
