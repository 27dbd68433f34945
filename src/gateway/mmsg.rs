//! Batched UDP I/O: every datagram waiting on a socket in one `recvmmsg(2)` call instead
//! of one `recvfrom(2)` each, and several datagrams to a connected peer in one
//! `sendmmsg(2)`, so that under load the syscall entry/exit, the epoll round trip and the
//! wake-up of the receiver are paid once per batch, not once per datagram.
//!
//! Segmentation offload (Linux `udp(7)`: `UDP_SEGMENT`, `UDP_GRO`): consecutive datagrams
//! of a batch that go to the same destination and have the same length (the last of a run
//! may be shorter) leave as ONE message with a `UDP_SEGMENT` control message, so the
//! kernel builds, routes and delivers one buffer for the run instead of one per datagram
//! (a gateway's requests to one origin, and answers to one busy client, are such runs:
//! same code, options and payload size). The wire is unchanged: a receiver sees the same
//! separate datagrams. A socket with `enable_gro` takes such a run (and what a NIC's GRO
//! coalesced) as one buffer, which `RecvBatch` splits back at the segment size the kernel
//! reports. If the kernel or the route refuses a segmented send (old kernel, a device
//! without checksum offload, IPsec), the process falls back to one message per datagram
//! for good (`GSO_REFUSED`).
//!
//! Hand-written over `libc` because neither tokio nor socket2 (0.6) offers `recvmmsg` or
//! `sendmmsg`; quinn-udp has GSO/GRO but is built for QUIC: it sets the don't-fragment bit
//! (path-MTU probing), which would turn a CoAP datagram larger than a link's MTU from a
//! fragmented datagram into an error, and it sends one destination per call.
//! Source addresses are converted by socket2's `SockAddr` (already a dependency of tokio).
//! Use it from tokio with `UdpSocket::async_io(Interest::READABLE, || batch.recv(fd))`:
//! the call is non-blocking and reports `WouldBlock` when nothing is waiting.

use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};

/// A slot holds the largest UDP payload (IPv6: 65 535 − 8) or a coalesced (GRO) buffer of
/// up to 64 KiB, so it never truncates a datagram.
const SLOT: usize = 65_535;

/// Room for one `cmsghdr` carrying an `int` or a `u16` (CMSG_SPACE(4) = 24 on 64-bit),
/// 8-byte aligned as `cmsghdr` needs.
type CmsgBuf = [u64; 4];

/// Datagrams in one segmented send at most (the kernel's UDP_MAX_SEGMENTS is 64 or more).
const GSO_MAX_SEGMENTS: usize = 64;
/// Datagrams longer than this are sent one message each: a segment must fit the path MTU
/// (1280 − 40 − 8, IPv6's minimum), or the kernel refuses the whole run.
const GSO_MAX_SEGMENT_LEN: usize = 1232;
/// The bytes of one segmented send at most: the largest UDP payload (IPv4: 65 535 − 8 − 20).
const GSO_MAX_TOTAL: usize = 65_507;

/// Set once a segmented send has been refused (old kernel, no checksum offload on the
/// route's device, IPsec): from then on every datagram is its own message.
static GSO_REFUSED: AtomicBool = AtomicBool::new(false);

/// Asks the kernel to hand this socket runs of datagrams from one sender as one buffer
/// (`UDP_GRO`, Linux ≥ 5.0); `RecvBatch` splits them. Returns whether the kernel accepted;
/// without it, datagrams arrive one by one as before.
pub fn enable_gro(fd: RawFd) -> bool {
    let on: libc::c_int = 1;
    // SAFETY: a valid option value of the size given.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_UDP,
            libc::UDP_GRO,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    r == 0
}

/// Receive buffers and results of one `recvmmsg` call.
pub struct RecvBatch {
    /// `batch` slots of `SLOT` bytes, never initialised by us (zeroing them would make all
    /// of them resident): only the pages the kernel writes datagrams to become resident,
    /// and only those bytes are ever read.
    bufs: Vec<MaybeUninit<u8>>,
    addrs: Vec<libc::sockaddr_storage>,
    hdrs: Vec<libc::mmsghdr>,
    iovs: Vec<libc::iovec>,
    ctrl: Vec<CmsgBuf>,
    /// The datagrams of the last call: (slot, offset in the slot, length); a slot holds
    /// several when the kernel coalesced them (GRO).
    datagrams: Vec<(u32, u32, u32)>,
}

// SAFETY: the raw pointers in `hdrs`/`iovs` only ever point into this struct's own heap
// buffers (`bufs`, `addrs`, `iovs`, `ctrl`), which move with it; they are rebuilt before each call.
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
            ctrl: vec![[0; 4]; batch],
            datagrams: Vec::with_capacity(batch),
        }
    }

    /// Receives the datagrams waiting on `fd` (at most the batch size of messages; more
    /// datagrams when the kernel coalesced some, see `enable_gro`) without blocking:
    /// `Ok(n)` with n ≥ 1 datagrams, or an error (`WouldBlock` when none is waiting).
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        self.recv_with(fd, libc::MSG_DONTWAIT)
    }

    /// For a blocking socket: waits for one datagram (up to the socket's receive timeout,
    /// then `WouldBlock`/`TimedOut`), then takes the others already waiting.
    pub fn recv_wait(&mut self, fd: RawFd) -> io::Result<usize> {
        self.recv_with(fd, libc::MSG_WAITFORONE)
    }

    fn recv_with(&mut self, fd: RawFd, flags: libc::c_int) -> io::Result<usize> {
        self.datagrams.clear();
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
            h.msg_control = self.ctrl[i].as_mut_ptr().cast();
            h.msg_controllen = std::mem::size_of::<CmsgBuf>() as _;
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
        for slot in 0..n as usize {
            let hdr = &self.hdrs[slot];
            let len = (hdr.msg_len as usize).min(SLOT);
            match gro_segment_size(&hdr.msg_hdr) {
                Some(seg) if seg > 0 => {
                    // A coalesced buffer: datagrams of `seg` bytes, the last one shorter
                    // or equal. If it was truncated (cannot happen with full-size slots),
                    // only the whole datagrams in it are kept.
                    let whole = if hdr.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
                        len - len % seg
                    } else {
                        len
                    };
                    let mut off = 0;
                    while off < whole {
                        let l = seg.min(whole - off);
                        self.datagrams.push((slot as u32, off as u32, l as u32));
                        off += l;
                    }
                }
                _ => {
                    // A datagram the kernel truncated is returned as empty, i.e. malformed.
                    let l = if hdr.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
                        0
                    } else {
                        len
                    };
                    self.datagrams.push((slot as u32, 0, l as u32));
                }
            }
        }
        Ok(self.datagrams.len())
    }

    /// Messages (slots) the last `recv` filled: fewer than `len` when the kernel coalesced
    /// runs of datagrams (`enable_gro`).
    pub fn messages(&self) -> usize {
        self.datagrams
            .last()
            .map_or(0, |&(slot, _, _)| slot as usize + 1)
    }

    /// Datagrams received by the last `recv`.
    pub fn len(&self) -> usize {
        self.datagrams.len()
    }

    pub fn is_empty(&self) -> bool {
        self.datagrams.is_empty()
    }

    /// Datagram `i` of the last `recv` and its source address (None for an address family
    /// other than IPv4/IPv6, which a UDP socket does not report).
    pub fn get(&self, i: usize) -> (&[u8], Option<SocketAddr>) {
        let (slot, off, len) = self.datagrams[i];
        let (slot, off, len) = (slot as usize, off as usize, len as usize);
        // SAFETY: the kernel wrote `msg_len` ≥ off + len bytes at the start of slot `slot`
        // (inside the allocation of batch * SLOT bytes), so these bytes are initialised.
        let data = unsafe {
            std::slice::from_raw_parts(self.bufs.as_ptr().add(slot * SLOT + off).cast::<u8>(), len)
        };
        let mut storage = socket2::SockAddrStorage::zeroed();
        // SAFETY: `sockaddr_storage` is a platform sockaddr type; the kernel wrote
        // `msg_namelen` (≤ its size) bytes of an address into it.
        let addr = unsafe {
            *storage.view_as::<libc::sockaddr_storage>() = self.addrs[slot];
            socket2::SockAddr::new(storage, self.hdrs[slot].msg_hdr.msg_namelen)
        };
        (data, addr.as_socket())
    }
}

/// The segment size of a coalesced receive (the `UDP_GRO` control message), if any.
fn gro_segment_size(h: &libc::msghdr) -> Option<usize> {
    // SAFETY: `h` is a header the kernel filled in: `msg_control`/`msg_controllen` describe
    // control messages inside our `CmsgBuf`, walked with the libc CMSG macros.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(h);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == libc::UDP_GRO {
                let v = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
                return usize::try_from(v).ok();
            }
            c = libc::CMSG_NXTHDR(h, c);
        }
    }
    None
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
/// its destination, or none on a connected socket. Runs of equal datagrams to one
/// destination go as one segmented message (module doc); `Ok` counts datagrams.
fn send_mmsg<'a>(
    fd: RawFd,
    n: usize,
    item: impl Fn(usize) -> (&'a [u8], Option<SocketAddr>),
) -> io::Result<usize> {
    send_mmsg_gso(fd, n, item, &GSO_REFUSED)
}

/// `send_mmsg` with the "segmentation refused" flag given (the process's, or a test's own).
fn send_mmsg_gso<'a>(
    fd: RawFd,
    n: usize,
    item: impl Fn(usize) -> (&'a [u8], Option<SocketAddr>),
    refused: &AtomicBool,
) -> io::Result<usize> {
    let n = n.min(SEND_BATCH);
    if n == 0 {
        return Ok(0);
    }
    let mut items: [(&[u8], Option<SocketAddr>); SEND_BATCH] = [(&[], None); SEND_BATCH];
    for (i, slot) in items.iter_mut().enumerate().take(n) {
        *slot = item(i);
    }
    let items = &items[..n];
    let gso = !refused.load(Ordering::Relaxed);
    match send_runs(fd, items, gso) {
        Err(e) if gso && gso_refused(&e) && first_run_len(items, true) > 1 => {
            // The kernel or the route cannot segment: one message per datagram from now on.
            refused.store(true, Ordering::Relaxed);
            tracing::info!("UDP segmentation offload refused ({e}): sending datagrams one by one");
            send_runs(fd, items, false)
        }
        r => r,
    }
}

/// Errors with which the kernel refuses a `UDP_SEGMENT` send it would take unsegmented.
fn gso_refused(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EIO | libc::EINVAL | libc::ENOPROTOOPT | libc::EOPNOTSUPP | libc::EMSGSIZE)
    )
}

/// How many of `items`, from the first, form one run: the same destination and the same
/// length (≥ 1 and ≤ GSO_MAX_SEGMENT_LEN); the run's last datagram may be shorter, and ends
/// it. 1 when segmentation is off or the first cannot start a run.
fn first_run_len(items: &[(&[u8], Option<SocketAddr>)], gso: bool) -> usize {
    let (first, to) = items[0];
    let seg = first.len();
    if !gso || seg == 0 || seg > GSO_MAX_SEGMENT_LEN {
        return 1;
    }
    let mut k = 1;
    let mut total = seg;
    while k < items.len() && k < GSO_MAX_SEGMENTS {
        let (d, t) = items[k];
        if t != to || d.is_empty() || d.len() > seg || total + d.len() > GSO_MAX_TOTAL {
            break;
        }
        k += 1;
        total += d.len();
        if d.len() < seg {
            break; // a shorter one can only be the last segment
        }
    }
    k
}

/// One `sendmmsg`: a message per run (`first_run_len`) of `items`; `Ok` counts datagrams.
fn send_runs(fd: RawFd, items: &[(&[u8], Option<SocketAddr>)], gso: bool) -> io::Result<usize> {
    // SAFETY: all-zero is a valid value of these plain C structs.
    let mut hdrs: [libc::mmsghdr; SEND_BATCH] = unsafe { std::mem::zeroed() };
    let mut iovs: [libc::iovec; SEND_BATCH] = unsafe { std::mem::zeroed() };
    let mut ctrl: [CmsgBuf; SEND_BATCH] = [[0; 4]; SEND_BATCH];
    let mut addrs: [Option<socket2::SockAddr>; SEND_BATCH] = std::array::from_fn(|_| None);
    // datagrams in message m
    let mut run_len = [0usize; SEND_BATCH];
    let (mut i, mut m) = (0, 0);
    while i < items.len() {
        let k = first_run_len(&items[i..], gso);
        for (j, (d, _)) in items[i..i + k].iter().enumerate() {
            iovs[i + j] = libc::iovec {
                // sendmmsg only reads through this pointer
                iov_base: d.as_ptr() as *mut libc::c_void,
                iov_len: d.len(),
            };
        }
        let h = &mut hdrs[m].msg_hdr;
        if let Some(to) = items[i].1 {
            let a = addrs[m].insert(socket2::SockAddr::from(to));
            h.msg_name = a.as_ptr() as *mut libc::c_void;
            h.msg_namelen = a.len();
        }
        h.msg_iov = &mut iovs[i];
        h.msg_iovlen = k as _;
        if k > 1 {
            // SAFETY: `ctrl[m]` is 8-byte aligned and has room for CMSG_SPACE(2) bytes; the
            // header and its u16 are written through the libc CMSG macros.
            unsafe {
                h.msg_control = ctrl[m].as_mut_ptr().cast();
                h.msg_controllen = libc::CMSG_SPACE(2) as _;
                let c = libc::CMSG_FIRSTHDR(h);
                (*c).cmsg_level = libc::SOL_UDP;
                (*c).cmsg_type = libc::UDP_SEGMENT;
                (*c).cmsg_len = libc::CMSG_LEN(2) as _;
                std::ptr::write_unaligned(
                    libc::CMSG_DATA(c).cast::<u16>(),
                    items[i].0.len() as u16,
                );
            }
        }
        run_len[m] = k;
        i += k;
        m += 1;
    }
    // SAFETY: `m` initialised headers, each with its iovecs over live datagrams, either no
    // address (connected socket) or a live address of the given length, and either no
    // control data or one UDP_SEGMENT message in `ctrl`.
    let sent =
        unsafe { libc::sendmmsg(fd, hdrs.as_mut_ptr(), m as libc::c_uint, libc::MSG_DONTWAIT) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(run_len[..sent as usize].iter().sum())
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

    fn lens(items: &[(&[u8], Option<SocketAddr>)]) -> Vec<usize> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < items.len() {
            let k = first_run_len(&items[i..], true);
            out.push(k);
            i += k;
        }
        out
    }

    #[test]
    fn runs_are_equal_lengths_to_one_destination_with_a_shorter_last() {
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:2".parse().unwrap();
        let (x, y, z, big) = (vec![1u8; 50], vec![2u8; 40], vec![3u8; 60], vec![4u8; 1300]);
        let items: Vec<(&[u8], Option<SocketAddr>)> = vec![
            (&x, Some(a)),
            (&x, Some(a)),
            (&y, Some(a)), // shorter: the run's last
            (&x, Some(a)),
            (&x, Some(b)), // another destination
            (&x, Some(b)),
            (&z, Some(b)), // longer: starts a new run
            (&big, Some(b)),
            (&big, Some(b)), // over GSO_MAX_SEGMENT_LEN: one message each
            (&[], Some(b)),
            (&[], Some(b)),
        ];
        assert_eq!(lens(&items), [3, 1, 2, 1, 1, 1, 1, 1]);
        assert_eq!(first_run_len(&items, false), 1, "segmentation off");
        let many: Vec<(&[u8], Option<SocketAddr>)> = vec![(&x, None); 100];
        assert_eq!(first_run_len(&many, true), GSO_MAX_SEGMENTS);
    }

    /// A run leaves as one segmented message and arrives at a `UDP_GRO` socket as one
    /// buffer, which `RecvBatch` splits back into the same datagrams, in order; a socket
    /// without GRO gets them one by one from the kernel (std's `recv` as the oracle).
    #[test]
    fn segmented_runs_arrive_whole_and_in_order_with_and_without_gro() {
        let plain = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let gro = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let gro_on = enable_gro(gro.as_raw_fd());
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut datagrams: Vec<Vec<u8>> = (0..20u8).map(|i| vec![i; 80]).collect();
        datagrams[9] = vec![9; 30]; // ends the first run
        datagrams.push(vec![99; 2000]); // its own message
        let refused = AtomicBool::new(false);
        for rx in [&plain, &gro] {
            let to = rx.local_addr().unwrap();
            let n = send_mmsg_gso(
                tx.as_raw_fd(),
                datagrams.len(),
                |i| (datagrams[i].as_slice(), Some(to)),
                &refused,
            )
            .unwrap();
            assert_eq!(n, datagrams.len());
        }
        assert!(!refused.load(Ordering::Relaxed));
        let mut buf = [0u8; 4096];
        for d in &datagrams {
            let k = plain.recv(&mut buf).unwrap();
            assert_eq!(&buf[..k], &d[..]);
        }
        let mut batch = RecvBatch::new(8);
        let mut got = Vec::new();
        let mut messages = 0;
        while got.len() < datagrams.len() {
            let n = batch.recv_wait(gro.as_raw_fd()).unwrap();
            messages += batch.messages();
            for i in 0..n {
                let (d, from) = batch.get(i);
                assert_eq!(from, Some(tx.local_addr().unwrap()));
                got.push(d.to_vec());
            }
        }
        assert_eq!(got, datagrams);
        if gro_on {
            assert_eq!(messages, 3, "two runs and the big one");
        }
    }

    /// A socket the kernel will not segment for (SO_NO_CHECK makes a UDP_SEGMENT send
    /// EINVAL): the datagrams still leave, one message each, and segmentation stays off.
    #[test]
    fn a_refused_segmented_send_falls_back_to_one_message_each() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.connect(rx.local_addr().unwrap()).unwrap();
        let one: libc::c_int = 1;
        // SAFETY: a valid option value of the size given.
        let r = unsafe {
            libc::setsockopt(
                tx.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_NO_CHECK,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(r, 0);
        let datagrams: Vec<Vec<u8>> = (0..6u8).map(|i| vec![i; 100]).collect();
        let refused = AtomicBool::new(false);
        let n = send_mmsg_gso(
            tx.as_raw_fd(),
            datagrams.len(),
            |i| (datagrams[i].as_slice(), None),
            &refused,
        )
        .unwrap();
        assert_eq!(n, 6);
        assert!(refused.load(Ordering::Relaxed), "the refusal is remembered");
        let mut buf = [0u8; 256];
        for d in &datagrams {
            let k = rx.recv(&mut buf).unwrap();
            assert_eq!(&buf[..k], &d[..]);
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
