//! Child processes: bounded runs, guards that kill on drop, PIDs.

use super::*;

/// Text of an Output for failure messages.
pub fn output_text(out: &Output) -> String {
    format!(
        "--- status: {}\n--- stdout:\n{}\n--- stderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// true if the process exists and is not a zombie.
pub fn pid_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // "pid (comm) S ..." — comm may contain spaces and parentheses
        Ok(stat) => stat
            .rsplit_once(") ")
            .map(|(_, rest)| !rest.starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}

/// Sends `sig` to `pid` (a process this test started).
pub fn send_signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) with a PID we started; no memory is involved.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// Waits (bounded) until `pid` is gone or a zombie.
pub fn wait_pid_gone(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if !pid_alive(pid) {
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    !pid_alive(pid)
}

/// Polls `cond` every 20 ms until it is true or `timeout` passed; returns its last value.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

type SharedBuf = Arc<Mutex<Vec<u8>>>;

fn drain(mut r: impl Read + Send + 'static, buf: SharedBuf) -> JoinHandle<()> {
    thread::spawn(move || {
        let mut chunk = [0u8; 8192];
        loop {
            match r.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.lock().unwrap().extend_from_slice(&chunk[..n]),
            }
        }
    })
}

/// A child process in its own process group, with stdin from /dev/null and stdout/stderr
/// collected by threads (so a chatty child never blocks on a full pipe). Drop kills the
/// whole group with SIGKILL and reaps the child, so nothing outlives a failing test.
pub struct ChildGuard {
    child: Option<Child>,
    what: String,
    stdout: SharedBuf,
    stderr: SharedBuf,
    readers: Vec<JoinHandle<()>>,
    status: Option<ExitStatus>,
}

impl ChildGuard {
    pub fn spawn(cmd: Command) -> ChildGuard {
        Self::spawn_inner(cmd, None)
    }

    /// Like [`ChildGuard::spawn`], with `input` written to the child's stdin (then closed).
    pub fn spawn_with_input(cmd: Command, input: Vec<u8>) -> ChildGuard {
        Self::spawn_inner(cmd, Some(input))
    }

    fn spawn_inner(mut cmd: Command, input: Option<Vec<u8>>) -> ChildGuard {
        let what = format!("{cmd:?}");
        cmd.stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        let stdout: SharedBuf = Arc::default();
        let stderr: SharedBuf = Arc::default();
        let mut readers = vec![
            drain(child.stdout.take().unwrap(), stdout.clone()),
            drain(child.stderr.take().unwrap(), stderr.clone()),
        ];
        if let (Some(data), Some(mut stdin)) = (input, child.stdin.take()) {
            // a thread, so a child that does not read cannot block us; EOF on drop
            readers.push(thread::spawn(move || {
                let _ = std::io::Write::write_all(&mut stdin, &data);
            }));
        }
        ChildGuard {
            child: Some(child),
            what,
            stdout,
            stderr,
            readers,
            status: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// true while the child has not exited.
    pub fn is_running(&mut self) -> bool {
        if self.status.is_some() {
            return false;
        }
        match self.child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(Some(st))) => {
                self.status = Some(st);
                false
            }
            Some(Ok(None)) => true,
            _ => false,
        }
    }

    /// What the child wrote to stdout so far.
    pub fn stdout_so_far(&self) -> Vec<u8> {
        self.stdout.lock().unwrap().clone()
    }

    pub fn stderr_so_far(&self) -> Vec<u8> {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits (bounded) until stdout contains `needle`; false on timeout or exit.
    pub fn wait_for_stdout(&mut self, needle: &str, timeout: Duration) -> bool {
        wait_until(timeout, || {
            String::from_utf8_lossy(&self.stdout_so_far()).contains(needle) || !self.is_running()
        }) && String::from_utf8_lossy(&self.stdout_so_far()).contains(needle)
    }

    /// SIGKILL to the child's process group (the child and whatever it started).
    pub fn kill9(&mut self) {
        if self.is_running() {
            let pid = self.pid();
            // SAFETY: kill(2) on the process group we created for this child.
            unsafe {
                libc::kill(-(pid as libc::pid_t), libc::SIGKILL);
            }
        }
    }

    /// Waits for the child to exit, at most `timeout`; on timeout kills the group and says
    /// so on the returned stderr. Output is whatever was collected.
    pub fn wait_timeout(mut self, timeout: Duration) -> Output {
        let deadline = Instant::now() + timeout;
        let mut timed_out = false;
        while self.is_running() {
            if Instant::now() >= deadline {
                timed_out = true;
                self.kill9();
                break;
            }
            thread::sleep(Duration::from_millis(10));
        }
        let status = self.reap();
        // readers end at EOF; a grandchild still holding the pipe must not hang us
        let readers_deadline = Instant::now() + Duration::from_secs(5);
        for r in self.readers.drain(..) {
            while !r.is_finished() && Instant::now() < readers_deadline {
                thread::sleep(Duration::from_millis(10));
            }
            if r.is_finished() {
                let _ = r.join();
            }
        }
        let mut stderr = self.stderr_so_far();
        if timed_out {
            stderr.extend_from_slice(
                format!(
                    "\n[harness] killed after the {} s timeout: {}\n",
                    timeout.as_secs_f32(),
                    self.what
                )
                .as_bytes(),
            );
        }
        Output {
            status,
            stdout: self.stdout_so_far(),
            stderr,
        }
    }

    fn reap(&mut self) -> ExitStatus {
        if let Some(st) = self.status {
            return st;
        }
        match self.child.as_mut() {
            Some(c) => {
                let st = c.wait().unwrap_or_else(|_| ExitStatus::from_raw(9));
                self.status = Some(st);
                st
            }
            None => ExitStatus::from_raw(9),
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.kill9();
            self.reap();
        }
    }
}

/// Runs `cmd` (stdin /dev/null) and returns its output; kills it after `timeout`.
pub fn run_with_timeout(cmd: Command, timeout: Duration) -> Output {
    ChildGuard::spawn(cmd).wait_timeout(timeout)
}

/// Runs `cmd` with `input` on stdin and returns its output; kills it after `timeout`.
pub fn run_with_input(cmd: Command, input: Vec<u8>, timeout: Duration) -> Output {
    ChildGuard::spawn_with_input(cmd, input).wait_timeout(timeout)
}
