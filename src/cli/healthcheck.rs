//! `kfrtrl healthcheck`: asks a local server whether it is ready, for container health checks
//! that must work without a shell or curl in the image. It finds the server the way
//! `kfrtrl serve` finds its address (`--listen`, then `KFRTRL_LISTEN`, then the `listen` of the
//! `KFRTRL_CONFIG` file, then the default) and exits 0 when the probe answers 200, 1 otherwise
//! (Docker reserves exit code 2).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

const DEFAULT_LISTEN: &str = "127.0.0.1:8080";

/// Flags of `kfrtrl healthcheck`.
#[derive(Debug, Args)]
pub struct HealthcheckArgs {
    /// Full URL to probe, instead of the server's own address and `--path`.
    #[arg(long)]
    url: Option<String>,
    /// The server's listen address [env: KFRTRL_LISTEN] [default: from KFRTRL_CONFIG, else
    /// 127.0.0.1:8080]; an unspecified address (0.0.0.0, [::]) is probed on loopback.
    #[arg(long)]
    listen: Option<String>,
    /// Path to probe: `/readyz` (serving) or `/healthz` (the process is up).
    #[arg(long, default_value = "/readyz")]
    path: String,
    /// Seconds to wait for the answer.
    #[arg(long, default_value_t = 2.0)]
    timeout_secs: f64,
    /// Print nothing, only set the exit code.
    #[arg(long, short)]
    quiet: bool,
}

fn non_empty_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// The `listen` setting of the config file named by `KFRTRL_CONFIG`, if any.
fn listen_from_config() -> Result<Option<String>, String> {
    let Some(path) = non_empty_env("KFRTRL_CONFIG").map(PathBuf::from) else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(table.get("listen").and_then(|v| v.as_str()).map(str::to_owned))
}

/// Where a client on this host reaches a server listening on `listen`.
fn probe_address(listen: &str) -> Result<SocketAddr, String> {
    let mut addr = listen
        .to_socket_addrs()
        .map_err(|e| format!("listen address `{listen}`: {e}"))?
        .next()
        .ok_or_else(|| format!("listen address `{listen}` resolves to nothing"))?;
    if addr.port() == 0 {
        return Err(format!("listen address `{listen}` has port 0: pass --url"));
    }
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => addr.set_ip(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        IpAddr::V6(ip) if ip.is_unspecified() => addr.set_ip(IpAddr::V6(Ipv6Addr::LOCALHOST)),
        _ => {}
    }
    Ok(addr)
}

fn target(args: &HealthcheckArgs) -> Result<String, String> {
    if let Some(url) = &args.url {
        return Ok(url.clone());
    }
    let listen = match args.listen.clone().or_else(|| non_empty_env("KFRTRL_LISTEN")) {
        Some(listen) => listen,
        None => listen_from_config()?.unwrap_or_else(|| DEFAULT_LISTEN.to_owned()),
    };
    Ok(format!("http://{}{}", probe_address(&listen)?, args.path))
}

async fn probe(url: &str, timeout: Duration) -> Result<(), String> {
    let client = reqwest::Client::builder().timeout(timeout).build().map_err(|e| e.to_string())?;
    let mut request = client.get(url);
    if let Some(key) = non_empty_env("KFRTRL_API_KEY") {
        request = request.bearer_auth(key);
    }
    let response = request.send().await.map_err(|e| format!("{url}: {e}"))?;
    let status = response.status();
    if status.is_success() {
        Ok(())
    } else {
        let body = response.text().await.unwrap_or_default();
        Err(format!("{url}: {status} {}", body.trim()))
    }
}

/// Probes the server; 0 when it answers 200, 1 otherwise.
pub fn run(args: HealthcheckArgs) -> ExitCode {
    let outcome = target(&args).and_then(|url| {
        // Past `Duration`'s range (about 5.8·10^11 years) `from_secs_f64` would panic.
        let timeout =
            Duration::try_from_secs_f64(args.timeout_secs).ok().filter(|t| !t.is_zero()).ok_or_else(
                || format!("--timeout-secs must be positive and finite (got {})", args.timeout_secs),
            )?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the async runtime: {e}"))?;
        runtime.block_on(probe(&url, timeout))?;
        Ok(url)
    });
    match outcome {
        Ok(url) => {
            if !args.quiet {
                println!("healthy: {url}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            if !args.quiet {
                eprintln!("kfrtrl healthcheck: unhealthy: {e}");
            }
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unspecified_addresses_are_probed_on_loopback() {
        assert_eq!(probe_address("0.0.0.0:8080").unwrap().to_string(), "127.0.0.1:8080");
        assert_eq!(probe_address("[::]:9000").unwrap().to_string(), "[::1]:9000");
        assert_eq!(probe_address("127.0.0.2:81").unwrap().to_string(), "127.0.0.2:81");
        assert!(probe_address("127.0.0.1:0").unwrap_err().contains("port 0"));
        assert!(probe_address("no-port").is_err());
    }
}
