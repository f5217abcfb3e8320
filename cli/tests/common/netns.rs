//! A simulated node as a real network host: a Linux network namespace joined to this one by
//! a veth pair, each end with its own address. Taking the namespace's end down is a silent
//! partition: packets stop, no socket is closed. Needs root (CAP_NET_ADMIN).

use std::process::Command;

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `ip`: {e}"))?;
    match out.status.success() {
        true => Ok(()),
        false => Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}

/// A network namespace `name` reachable at `inside` from this namespace's `outside`.
pub struct Netns {
    pub name: String,
    /// This (the root) namespace's address on the link.
    pub outside: String,
    /// The namespace's address.
    pub inside: String,
    host_end: String,
    ns_end: String,
}

impl Netns {
    /// Creates the namespace and its link, or says why it cannot (not root, no `ip`).
    pub fn create(tag: &str) -> Result<Self, String> {
        // Unique per test process: names and a /24 of their own.
        let id = std::process::id() % 200 + 20;
        let ns = Self {
            name: format!("lillm-{tag}-{}", std::process::id()),
            outside: format!("10.213.{id}.1"),
            inside: format!("10.213.{id}.2"),
            host_end: format!("llh{id}"),
            ns_end: format!("lln{id}"),
        };
        ip(&["netns", "add", &ns.name])?;
        let (host, inner) = (ns.host_end.as_str(), ns.ns_end.as_str());
        ip(&["link", "add", host, "type", "veth", "peer", "name", inner])?;
        ip(&["link", "set", inner, "netns", &ns.name])?;
        ip(&["addr", "add", &format!("{}/24", ns.outside), "dev", host])?;
        ip(&["link", "set", host, "up"])?;
        ns.exec(&[
            "ip",
            "addr",
            "add",
            &format!("{}/24", ns.inside),
            "dev",
            inner,
        ])?;
        ns.exec(&["ip", "link", "set", inner, "up"])?;
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    fn exec(&self, cmd: &[&str]) -> Result<(), String> {
        let mut args = vec!["netns", "exec", &self.name];
        args.extend(cmd);
        ip(&args)
    }

    /// The command line that runs `program args` inside the namespace (`ip netns exec`
    /// execs it, so the child's pid is the program's).
    pub fn wrap(&self, program: &str, args: &[String]) -> (String, Vec<String>) {
        let mut all = vec![
            "netns".to_string(),
            "exec".into(),
            self.name.clone(),
            program.into(),
        ];
        all.extend(args.iter().cloned());
        ("ip".into(), all)
    }

    /// Cuts the link from inside the namespace: a silent partition.
    pub fn partition(&self) {
        self.exec(&["ip", "link", "set", &self.ns_end, "down"])
            .unwrap();
    }

    pub fn heal(&self) {
        self.exec(&["ip", "link", "set", &self.ns_end, "up"])
            .unwrap();
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.host_end]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}
