//! A request waits as long as its caller says, not the NATS client's default (10 s): a step
//! may take longer than that on a healthy executor (the scheduler waits `--step-timeout-s`,
//! 60 s by default). Runs a real nats-server (from PATH).

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use pagemesh_bus::bus::{Bus, BusError, NatsOptions};
use pagemesh_shared::wire::{Encoding, Endpoint};

/// A nats-server on a free loopback port, stopped when dropped.
struct NatsServer {
    child: Child,
    url: String,
}

impl NatsServer {
    fn start() -> Self {
        let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port());
        let port = port.expect("a free port");
        let child = Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server on PATH (apt-get install nats-server)");
        Self { child, url: format!("nats://127.0.0.1:{port}") }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn options(url: &str) -> NatsOptions {
    NatsOptions {
        url: url.to_string(),
        user: None,
        password: None,
        token: None,
        creds: None,
        nkey_seed: None,
        inbox_prefix: "_INBOX".into(),
        prefix: "deadline".into(),
    }
}

fn slow() -> Endpoint<String, String> {
    Endpoint::new("deadline.slow".into(), Encoding::Json)
}

/// Answers every request on `subject` after `delay`.
async fn slow_responder(bus: &Bus, subject: &str, delay: Duration) {
    let mut requests = bus.client.subscribe(subject.to_string()).await.expect("subscribe");
    let client = bus.client.clone();
    tokio::spawn(async move {
        while let Some(msg) = requests.next().await {
            tokio::time::sleep(delay).await;
            if let Some(reply) = msg.reply {
                let _ = client.publish(reply, "\"late but fine\"".into()).await;
            }
        }
    });
    bus.client.flush().await.expect("flush");
}

#[test]
fn a_request_waits_past_the_clients_default_timeout_when_its_deadline_allows() {
    let server = NatsServer::start();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let bus = Bus::connect(&options(&server.url), "pagemesh-test", Duration::from_secs(10)).await.expect("connect");
        slow_responder(&bus, "deadline.slow", Duration::from_secs(11)).await;
        let started = Instant::now();
        let answer: Result<String, BusError> = bus.request(&slow(), &"step".to_string(), Duration::from_secs(20)).await;
        assert_eq!(answer.expect("an answer after 11 s, within the 20 s deadline"), "late but fine");
        assert!(started.elapsed() >= Duration::from_secs(11));

        // And the caller's deadline still holds when it is the shorter one.
        let started = Instant::now();
        let answer: Result<String, BusError> = bus.request(&slow(), &"step".to_string(), Duration::from_secs(1)).await;
        assert!(matches!(answer, Err(BusError::Timeout(_))), "{answer:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
    });
}
