//! A fixed number of OSCORE protect+unprotect round trips, the same messages as
//! `benches/oscore.rs`, for instruction counts under callgrind (repeatable on a shared
//! machine, unlike criterion's wall clock):
//!
//! ```sh
//! cargo build --release --example oscore_loop
//! valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.out \
//!     target/release/examples/oscore_loop request AES-CCM-16-64-128 64 10000
//! ```
//!
//! Arguments: `request|response`, algorithm name (as in the bench ids, `/` written as `-`),
//! payload size, iterations. Divide the `main` total by the iterations (set-up is a few
//! hundred thousand instructions; compare with a run of 0 iterations to subtract it).
//!
//! Without valgrind it also prints the loop's thread CPU time per iteration (time the thread
//! was preempted by other processes does not count, unlike criterion's wall clock).

use std::hint::black_box;

use oscore_gateway::coap::{number, Code, MessageBuilder, MessageType, MessageView};
use oscore_gateway::oscore::{
    protect_request, protect_response, unprotect_request, unprotect_response, AeadAlgorithm,
    ContextParams, HkdfAlgorithm, ReplayWindow, SecurityContext, SenderSequenceNumber,
};

fn message(mtype: MessageType, code: Code, opts: &[(u16, &[u8])], payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut b = MessageBuilder::new(&mut out, mtype, code, 0x1234, &[1, 2, 3, 4]).unwrap();
    for (n, v) in opts {
        b.option(*n, v).unwrap();
    }
    b.payload(payload);
    out
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: oscore_loop request|response ALGORITHM SIZE ITERATIONS";
    let [_, direction, alg, size, iterations] = &args[..] else {
        eprintln!("{usage}");
        std::process::exit(2);
    };
    let aead = AeadAlgorithm::ALL
        .into_iter()
        .find(|a| a.name().replace('/', "-") == *alg)
        .unwrap_or_else(|| {
            eprintln!("unknown algorithm {alg}");
            std::process::exit(2)
        });
    let size: usize = size.parse().expect(usage);
    let iterations: u64 = iterations.parse().expect(usage);

    let p = ContextParams {
        master_secret: vec![0x42; 16],
        master_salt: vec![0x9e; 8],
        sender_id: vec![],
        recipient_id: vec![1],
        id_context: None,
        aead,
        hkdf: HkdfAlgorithm::Sha256,
        replay_window: 32,
    };
    let mut q = p.clone();
    std::mem::swap(&mut q.sender_id, &mut q.recipient_id);
    let client = SecurityContext::derive(&p, ReplayWindow::new_empty(32)).unwrap();
    let server = SecurityContext::derive(&q, ReplayWindow::new_empty(32)).unwrap();
    let (mut wire, mut back) = (Vec::with_capacity(size + 64), Vec::with_capacity(size + 64));

    let start = thread_cpu_ns();
    match direction.as_str() {
        "request" => {
            let payload = vec![0xa5; size];
            let plain = message(
                MessageType::Confirmable,
                Code::POST,
                &[
                    (number::URI_HOST, b"origin.example"),
                    (number::URI_PATH, b"sensors"),
                    (number::URI_PATH, b"temp"),
                    (number::CONTENT_FORMAT, &[50]),
                ],
                &payload,
            );
            let view = MessageView::parse(&plain).unwrap();
            for ssn in 1..=iterations {
                protect_request(&client, SenderSequenceNumber(ssn), &view, &mut wire).unwrap();
                let outer = MessageView::parse(&wire).unwrap();
                unprotect_request(&server, &outer, &mut back).unwrap();
                black_box(back.len());
            }
        }
        "response" => {
            let request = message(MessageType::Confirmable, Code::GET, &[], b"");
            let client_binding = protect_request(
                &client,
                SenderSequenceNumber(1),
                &MessageView::parse(&request).unwrap(),
                &mut wire,
            )
            .unwrap();
            let server_binding =
                unprotect_request(&server, &MessageView::parse(&wire).unwrap(), &mut back).unwrap();
            let payload = vec![0x5a; size];
            let plain = message(
                MessageType::Acknowledgement,
                Code::CONTENT,
                &[(number::CONTENT_FORMAT, &[50]), (number::MAX_AGE, &[60])],
                &payload,
            );
            let view = MessageView::parse(&plain).unwrap();
            for _ in 0..iterations {
                protect_response(&server, &server_binding, None, &view, &mut wire).unwrap();
                let outer = MessageView::parse(&wire).unwrap();
                unprotect_response(&client, &client_binding, &outer, &mut back).unwrap();
                black_box(back.len());
            }
        }
        _ => {
            eprintln!("{usage}");
            std::process::exit(2);
        }
    }
    if iterations > 0 {
        let per = (thread_cpu_ns() - start) as f64 / iterations as f64;
        eprintln!("{direction} {alg} {size}: {per:.1} ns CPU per protect+unprotect");
    }
}

fn thread_cpu_ns() -> u128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for clock_gettime to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u128 * 1_000_000_000 + ts.tv_nsec as u128
}
