//! Batched UDP I/O: every datagram waiting on a socket in one `recvmmsg(2)` call instead
//! of one `recvfrom(2)` each, and several datagrams to a connected peer in one
//! `sendmmsg(2)`, so that under load the syscall entry/exit, the epoll round trip and the
//! wake-up of the receiver are paid once per batch, not once per datagram (the
//! per-datagram kernel work stays).
//!
//! Hand-written over `libc` because neither tokio nor socket2 (0.6) offers `recvmmsg` or
//! `sendmmsg`;
//! source addresses are converted by socket2's `SockAddr` (already a dependency of tokio).
//! Use it from tokio with `UdpSocket::async_io(Interest::READABLE, || batch.recv(fd))`:
//! the call is non-blocking and reports `WouldBlock` when nothing is waiting.

use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::RawFd;

/// The largest UDP payload (IPv4: 65 535 − 8 − 20): a slot never truncates a datagram.
const SLOT: usize = 65_507;

/// Receive buffers and results of one `recvmmsg` call.
pub struct RecvBatch {
    /// `batch` slots of `SLOT` bytes, never initialised by us (zeroing them would make all
    /// of them resident): only the pages the kernel writes datagrams to become resident,
    /// and only those bytes are ever read.
    bufs: Vec<MaybeUninit<u8>>,
    addrs: Vec<libc::sockaddr_storage>,
    hdrs: Vec<libc::mmsghdr>,
    iovs: Vec<libc::iovec>,
    received: usize,
}

// SAFETY: the raw pointers in `hdrs`/`iovs` only ever point into this struct's own heap
// buffers (`bufs`, `addrs`, `iovs`), which move with it; they are rebuilt before each call.
unsafe impl Send for RecvBatch {}

impl RecvBatch {
    /// Room for `batch` datagrams (at least 1).
    pub fn new(batch: usize) -> Self {
        let batch = batch.max(1);
        // SAFETY: all-zero is a valid value of these plain C structs.
        let zero_addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let zero_hdr: libc::mmsghdr = unsafe { std::mem::zeroed() };
        Self {
            bufs: Vec::with_capacity(batch * SLOT),
            addrs: vec![zero_addr; batch],
            hdrs: vec![zero_hdr; batch],
            iovs: vec![
                libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                };
                batch
            ],
            received: 0,
        }
    }

    /// Receives the datagrams waiting on `fd` (at most the batch size) without blocking:
    /// `Ok(n)` with n ≥ 1, or an error (`WouldBlock` when none is waiting).
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        self.recv_with(fd, libc::MSG_DONTWAIT)
    }

    /// For a blocking socket: waits for one datagram (up to the socket's receive timeout,
    /// then `WouldBlock`/`TimedOut`), then takes the others already waiting.
    pub fn recv_wait(&mut self, fd: RawFd) -> io::Result<usize> {
        self.recv_with(fd, libc::MSG_WAITFORONE)
    }

    fn recv_with(&mut self, fd: RawFd, flags: libc::c_int) -> io::Result<usize> {
        self.received = 0;
        let batch = self.hdrs.len();
        // the allocation (len 0, capacity batch * SLOT; never grown, so never moved)
        let base = self.bufs.as_mut_ptr();
        for i in 0..batch {
            self.iovs[i] = libc::iovec {
                // SAFETY: slot i lies inside `bufs` (batch * SLOT bytes).
                iov_base: unsafe { base.add(i * SLOT) }.cast(),
                iov_len: SLOT,
            };
            let h = &mut self.hdrs[i].msg_hdr;
            h.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_iov = &mut self.iovs[i];
            h.msg_iovlen = 1;
            h.msg_control = std::ptr::null_mut();
            h.msg_controllen = 0;
            h.msg_flags = 0;
            self.hdrs[i].msg_len = 0;
        }
        // SAFETY: `hdrs` holds `batch` initialised headers whose name and iovec pointers
        // point into live buffers of the sizes given; no timeout pointer.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                self.hdrs.as_mut_ptr(),
                batch as libc::c_uint,
                flags,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        self.received = n as usize;
        Ok(self.received)
    }

    /// Datagrams received by the last `recv`.
    pub fn len(&self) -> usize {
        self.received
    }

    pub fn is_empty(&self) -> bool {
        self.received == 0
    }

    /// Datagram `i` of the last `recv` and its source address (None for an address family
    /// other than IPv4/IPv6, which a UDP socket does not report). A datagram the kernel
    /// truncated (cannot happen with full-size slots) is returned as empty, i.e. malformed.
    pub fn get(&self, i: usize) -> (&[u8], Option<SocketAddr>) {
        let hdr = &self.hdrs[i];
        let len = if hdr.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
            0
        } else {
            (hdr.msg_len as usize).min(SLOT)
        };
        // SAFETY: the kernel wrote `msg_len` bytes at the start of slot i (inside the
        // allocation of batch * SLOT bytes), so these bytes are initialised.
        let data = unsafe {
            std::slice::from_raw_parts(self.bufs.as_ptr().add(i * SLOT).cast::<u8>(), len)
        };
        let mut storage = socket2::SockAddrStorage::zeroed();
        // SAFETY: `sockaddr_storage` is a platform sockaddr type; the kernel wrote
        // `msg_namelen` (≤ its size) bytes of an address into it.
        let addr = unsafe {
            *storage.view_as::<libc::sockaddr_storage>() = self.addrs[i];
            socket2::SockAddr::new(storage, hdr.msg_hdr.msg_namelen)
        };
        (data, addr.as_socket())
    }
}

/// Datagrams per `send_batch` call, at most.
pub const SEND_BATCH: usize = 32;

/// Sends `datagrams` (at most `SEND_BATCH` of them) on the connected socket `fd` in one
/// non-blocking `sendmmsg`: `Ok(n)` with the number sent (≥ 1; the rest may be retried),
/// or the error of the first (`WouldBlock` when the send buffer is full).
pub fn send_batch(fd: RawFd, datagrams: &[Vec<u8>]) -> io::Result<usize> {
    send_batch_with(fd, datagrams.len(), |i| datagrams[i].as_slice())
}

/// `send_batch` for `n` datagrams held elsewhere, datagram `i` being `item(i)`.
pub fn send_batch_with<'a>(
    fd: RawFd,
    n: usize,
    item: impl Fn(usize) -> &'a [u8],
) -> io::Result<usize> {
    send_mmsg(fd, n, |i| (item(i), None))
}

/// Sends `n` datagrams (at most `SEND_BATCH` of them), datagram `i` being `item(i)` =
/// (bytes, destination), on the unconnected socket `fd` in one non-blocking `sendmmsg`:
/// `Ok(sent)` (≥ 1; the rest may be retried) or the error of the first.
pub fn send_batch_to<'a>(
    fd: RawFd,
    n: usize,
    item: impl Fn(usize) -> (&'a [u8], SocketAddr),
) -> io::Result<usize> {
    send_mmsg(fd, n, |i| {
        let (d, to) = item(i);
        (d, Some(to))
    })
}

/// One non-blocking `sendmmsg` of `item(0..n)` (at most `SEND_BATCH`): each datagram with
/// its destination, or none on a connected socket.
fn send_mmsg<'a>(
    fd: RawFd,
    n: usize,
    item: impl Fn(usize) -> (&'a [u8], Option<SocketAddr>),
) -> io::Result<usize> {
    let n = n.min(SEND_BATCH);
    if n == 0 {
        return Ok(0);
    }
    // SAFETY: all-zero is a valid value of these plain C structs.
    let mut hdrs: [libc::mmsghdr; SEND_BATCH] = unsafe { std::mem::zeroed() };
    let mut iovs: [libc::iovec; SEND_BATCH] = unsafe { std::mem::zeroed() };
    let mut addrs: [Option<socket2::SockAddr>; SEND_BATCH] = std::array::from_fn(|_| None);
    for i in 0..n {
        let (d, to) = item(i);
        iovs[i] = libc::iovec {
            // sendmmsg only reads through this pointer
            iov_base: d.as_ptr() as *mut libc::c_void,
            iov_len: d.len(),
        };
        if let Some(to) = to {
            let a = addrs[i].insert(socket2::SockAddr::from(to));
            hdrs[i].msg_hdr.msg_name = a.as_ptr() as *mut libc::c_void;
            hdrs[i].msg_hdr.msg_namelen = a.len();
        }
        hdrs[i].msg_hdr.msg_iov = &mut iovs[i];
        hdrs[i].msg_hdr.msg_iovlen = 1;
    }
    // SAFETY: `n` initialised headers, each with one iovec over a live datagram and either
    // no address (connected socket) or a live address of the given length.
    let sent =
        unsafe { libc::sendmmsg(fd, hdrs.as_mut_ptr(), n as libc::c_uint, libc::MSG_DONTWAIT) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sent as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn send_batch_sends_each_datagram_whole_and_in_order() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.connect(rx.local_addr().unwrap()).unwrap();
        let datagrams: Vec<Vec<u8>> = (0..40u8)
            .map(|i| vec![i; 1 + usize::from(i) * 100])
            .collect();
        assert_eq!(send_batch(tx.as_raw_fd(), &datagrams).unwrap(), SEND_BATCH);
        assert_eq!(
            send_batch(tx.as_raw_fd(), &datagrams[SEND_BATCH..]).unwrap(),
            8
        );
        assert_eq!(send_batch(tx.as_raw_fd(), &[]).unwrap(), 0);
        let mut buf = vec![0u8; 8192];
        for d in &datagrams {
            let n = rx.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], &d[..]);
        }
    }

    #[test]
    fn send_batch_to_reaches_each_destination() {
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let items: Vec<(Vec<u8>, SocketAddr)> = (0..5u8)
            .map(|i| {
                let to = if i % 2 == 0 { &a } else { &b };
                (vec![i; 10 + usize::from(i)], to.local_addr().unwrap())
            })
            .collect();
        let n = send_batch_to(tx.as_raw_fd(), items.len(), |i| (&items[i].0, items[i].1)).unwrap();
        assert_eq!(n, 5);
        let mut buf = [0u8; 64];
        for (d, to) in &items {
            let rx = if *to == a.local_addr().unwrap() {
                &a
            } else {
                &b
            };
            let (k, from) = rx.recv_from(&mut buf).unwrap();
            assert_eq!((&buf[..k], from), (&d[..], tx.local_addr().unwrap()));
        }
    }

    /// Cross-checked against std's `recv_from`: the same bytes and source addresses, in
    /// order, and WouldBlock when nothing waits.
    #[test]
    fn receives_every_waiting_datagram_with_its_source() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = rx.local_addr().unwrap();
        let mut batch = RecvBatch::new(4);
        let e = batch.recv(rx.as_raw_fd()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        let big = vec![7u8; 60_000];
        a.send_to(b"one", to).unwrap();
        b.send_to(&big, to).unwrap();
        a.send_to(b"", to).unwrap();
        for _ in 0..6 {
            b.send_to(b"more", to).unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(
            batch.recv(rx.as_raw_fd()).unwrap(),
            4,
            "at most the batch size"
        );
        assert_eq!(batch.get(0), (&b"one"[..], Some(a.local_addr().unwrap())));
        assert_eq!(batch.get(1), (&big[..], Some(b.local_addr().unwrap())));
        assert_eq!(batch.get(2), (&b""[..], Some(a.local_addr().unwrap())));
        assert_eq!(batch.get(3).0, b"more");
        assert_eq!(batch.recv(rx.as_raw_fd()).unwrap(), 4);
        assert_eq!(batch.recv(rx.as_raw_fd()).unwrap(), 1);
        b.send_to(b"last", to).unwrap();
        rx.set_read_timeout(Some(std::time::Duration::from_millis(50)))
            .unwrap();
        assert_eq!(batch.recv_wait(rx.as_raw_fd()).unwrap(), 1);
        assert_eq!(batch.get(0).0, b"last");
        let e = batch.recv_wait(rx.as_raw_fd()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock, "the receive timeout");
        let mut buf = [0u8; 16];
        rx.set_nonblocking(true).unwrap();
        assert!(rx.recv_from(&mut buf).is_err(), "all were taken");
    }
}
