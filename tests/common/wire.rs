//! On the wire: wire_check.sh and reading its captures with tshark.

use super::*;

/// The `wire_check.sh` command line: capture loopback UDP while `cmd` runs, decode `ports`
/// as CoAP, with `require_port` exit 4 if a plain request reached it; keep the capture at
/// `pcap` if given. Temp files go to `interop_dir`.
pub fn wire_check_command<S: AsRef<OsStr>>(
    interop_dir: &Path,
    ports: &[u16],
    require_port: Option<u16>,
    pcap: Option<&Path>,
    cmd: &[S],
) -> Command {
    let mut c = Command::new(interop().script("wire_check.sh"));
    c.current_dir(interop_dir).env("INTEROP_DIR", interop_dir);
    if !ports.is_empty() {
        let list: Vec<String> = ports.iter().map(u16::to_string).collect();
        c.arg("-p").arg(list.join(","));
    }
    if let Some(p) = require_port {
        c.arg("-r").arg(p.to_string());
    }
    if let Some(p) = pcap {
        c.arg("-w").arg(p);
    }
    c.arg("--").args(cmd);
    c
}

/// Runs `cmd` under wire_check.sh (needs root, tcpdump, tshark: `setup.sh --apt`).
/// tcpdump sees all loopback UDP, so judge only this test's own ports. Exit status: the
/// command's, 4 if a plain request reached `require_port`, 5 if no CoAP was captured.
pub fn run_wire_check<S: AsRef<OsStr>>(
    interop_dir: &Path,
    ports: &[u16],
    require_port: Option<u16>,
    pcap: Option<&Path>,
    cmd: &[S],
) -> Output {
    let c = wire_check_command(interop_dir, ports, require_port, pcap, cmd);
    run_with_timeout(c, WIRE_CHECK_TIMEOUT)
}

/// One CoAP message from a capture, as tshark decoded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireMessage {
    pub frame: u64,
    pub src_port: u16,
    pub dst_port: u16,
    /// 0 CON, 1 NON, 2 ACK, 3 RST
    pub mtype: u8,
    /// outer code as a number (class * 32 + detail): 2 = POST, 68 = 2.04
    pub code: u8,
    pub mid: u16,
    pub token: String,
    /// outer option names, e.g. ["Uri-Host", "OSCORE"]
    pub options: Vec<String>,
    /// kid in the OSCORE option (hex), if any
    pub kid: Option<String>,
    /// Partial IV in the OSCORE option as a number, if any
    pub piv: Option<u64>,
    /// inner code when tshark could decrypt it (make_contexts.py's secret, kids 01..04)
    pub inner_code: Option<u8>,
}

impl WireMessage {
    pub fn is_request(&self) -> bool {
        (1..=31).contains(&self.code)
    }

    pub fn is_oscore(&self) -> bool {
        self.options.iter().any(|o| o == "OSCORE")
    }
}

/// Every CoAP message to or from `port` in `pcap`, in capture order. OSCORE is decrypted
/// for make_contexts.py's contexts with kids 01..04 (as wire_check.sh does) where tshark can.
pub fn capture_messages(pcap: &Path, port: u16) -> Vec<WireMessage> {
    let conf = tempfile::tempdir().unwrap();
    let ws = conf.path().join("wireshark");
    fs::create_dir_all(&ws).unwrap();
    let secret = hex::encode("Correct Horse Battery Staple");
    let file = hex::encode("file");
    let uat: String = ["01", "02", "03", "04"]
        .iter()
        .map(|k| {
            format!("\"{k}\",\"{file}\",\"{secret}\",\"\",\"\",\"AES-CCM-16-64-128 (CCM*)\"\n")
        })
        .collect();
    fs::write(ws.join("oscore_contexts"), uat).unwrap();
    let mut cmd = Command::new("tshark");
    // every occurrence of a field, joined by ',' (several outer options); single-valued
    // fields are read with first()
    cmd.env("XDG_CONFIG_HOME", conf.path())
        .arg("-r")
        .arg(pcap)
        .arg("-d")
        .arg(format!("udp.port=={port},coap"))
        .arg("-Y")
        .arg(format!("coap && udp.port=={port}"))
        .args(["-T", "fields", "-E", "separator=|", "-E", "occurrence=a"])
        .args(["-E", "aggregator=,"]);
    for f in [
        "frame.number",
        "udp.srcport",
        "udp.dstport",
        "coap.type",
        "coap.code",
        "coap.mid",
        "coap.token",
        "coap.opt.name",
        "coap.opt.object_security_kid",
        "coap.opt.object_security_piv",
        "oscore.code",
    ] {
        cmd.arg("-e").arg(f);
    }
    let out = run_with_timeout(cmd, Duration::from_secs(120));
    assert!(
        out.status.success(),
        "tshark on {} failed:\n{}",
        pcap.display(),
        output_text(&out)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| parse_wire_line(l).unwrap_or_else(|| panic!("unexpected tshark line {l:?}")))
        .collect()
}

fn first(field: &str) -> &str {
    field.split(',').next().unwrap_or("")
}

fn parse_wire_line(line: &str) -> Option<WireMessage> {
    let f: Vec<&str> = line.split('|').collect();
    if f.len() < 11 {
        return None;
    }
    let opt_hex = |s: &str| {
        let s = first(s).replace(':', "");
        (!s.is_empty()).then_some(s)
    };
    Some(WireMessage {
        frame: first(f[0]).parse().ok()?,
        src_port: first(f[1]).parse().ok()?,
        dst_port: first(f[2]).parse().ok()?,
        mtype: first(f[3]).parse().ok()?,
        code: first(f[4]).parse().ok()?,
        mid: first(f[5]).parse().ok()?,
        token: first(f[6]).replace(':', ""),
        options: f[7]
            .split(',')
            .filter(|s| !s.is_empty())
            // tshark 4.0 prefixes each name with "#N: "
            .map(|s| s.rsplit(": ").next().unwrap_or(s).to_string())
            .collect(),
        kid: opt_hex(f[8]),
        piv: opt_hex(f[9])
            .map(|h| u64::from_str_radix(&h, 16).ok())
            .unwrap_or(None),
        inner_code: first(f[10]).parse().ok(),
    })
}

/// Requests in `msgs` sent to `port` whose OSCORE kid is `kid`, without CoAP
/// retransmissions (same source port and MID counted once).
pub fn oscore_requests_to(msgs: &[WireMessage], port: u16, kid: &str) -> Vec<WireMessage> {
    let mut seen = HashSet::new();
    msgs.iter()
        .filter(|m| m.dst_port == port && m.is_request() && m.kid.as_deref() == Some(kid))
        .filter(|m| seen.insert((m.src_port, m.mid)))
        .cloned()
        .collect()
}

/// Requests in `msgs` sent to `port` without an OSCORE option.
pub fn plain_requests_to(msgs: &[WireMessage], port: u16) -> Vec<WireMessage> {
    msgs.iter()
        .filter(|m| m.dst_port == port && m.is_request() && !m.is_oscore())
        .cloned()
        .collect()
}

/// A per-port summary for failure messages.
pub fn describe_capture(msgs: &[WireMessage]) -> String {
    let mut per_port: BTreeMap<(u16, bool), usize> = BTreeMap::new();
    for m in msgs.iter().filter(|m| m.is_request()) {
        *per_port.entry((m.dst_port, m.is_oscore())).or_default() += 1;
    }
    let mut s = String::new();
    for m in msgs.iter().take(60) {
        s.push_str(&format!("{m:?}\n"));
    }
    if msgs.len() > 60 {
        s.push_str(&format!("... {} more\n", msgs.len() - 60));
    }
    for ((port, oscore), n) in per_port {
        s.push_str(&format!(
            "requests to {port} ({}): {n}\n",
            if oscore { "OSCORE" } else { "plain" }
        ));
    }
    s
}
