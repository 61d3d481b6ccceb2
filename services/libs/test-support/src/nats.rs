//! `TestNats`: a JetStream stream and subject prefix of its own per test on the
//! shared NATS server; `NatsServer`: a private nats-server process, for tests
//! that stop and restart NATS.
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The server the tests use: `CRM__NATS__URL`, else the project-local one that
/// `just up` / `just test` start.
pub fn shared_url() -> String {
    std::env::var("CRM__NATS__URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

/// A stream name and subject prefix no other test uses; the stream is deleted
/// when the value is dropped.
pub struct TestNats {
    pub url: String,
    pub stream: String,
    pub subject_prefix: String,
}

impl TestNats {
    pub fn shared() -> Self {
        Self::on(shared_url())
    }

    /// Names of its own on the server at `url`.
    pub fn on(url: String) -> Self {
        let id = uuid::Uuid::now_v7().simple().to_string();
        Self {
            url,
            stream: format!("T_{id}"),
            subject_prefix: format!("t{id}.crm.v1"),
        }
    }

    pub async fn jetstream(&self) -> async_nats::jetstream::Context {
        let client = async_nats::connect(self.url.as_str())
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "cannot reach NATS for tests at {} ({e}); run `just up` or set CRM__NATS__URL",
                    self.url
                )
            });
        async_nats::jetstream::new(client)
    }

    /// An ordered consumer over the test stream from its first message, as a
    /// plain NATS subscriber would read it, filtered by subject (`>`: all).
    pub async fn ordered_messages(
        &self,
        filter: &str,
    ) -> async_nats::jetstream::consumer::pull::Ordered {
        let js = self.jetstream().await;
        let stream = js
            .get_stream(&self.stream)
            .await
            .unwrap_or_else(|e| panic!("stream {}: {e}", self.stream));
        stream
            .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
                filter_subject: filter.to_owned(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("ordered consumer on {}: {e}", self.stream))
            .messages()
            .await
            .unwrap_or_else(|e| panic!("messages of {}: {e}", self.stream))
    }
}

impl Drop for TestNats {
    fn drop(&mut self) {
        if std::env::var_os("CRM_TEST_KEEP_DB").is_some() {
            return;
        }
        let url = self.url.clone();
        let stream = self.stream.clone();
        // As for TestDb: a runtime of our own on a plain thread.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime for deleting the test stream");
            runtime.block_on(async move {
                let connect = async_nats::ConnectOptions::new()
                    .connection_timeout(Duration::from_secs(2))
                    .connect(url.as_str());
                if let Ok(client) = connect.await {
                    let _ = async_nats::jetstream::new(client)
                        .delete_stream(&stream)
                        .await;
                }
            });
        })
        .join();
    }
}

/// A nats-server of its own (JetStream, file storage in a temp directory) on a
/// free loopback port; killed and its directory removed when dropped.
pub struct NatsServer {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl NatsServer {
    pub fn start() -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let dir = std::env::temp_dir().join(format!("crm-nats-{}", uuid::Uuid::now_v7().simple()));
        std::fs::create_dir_all(&dir).expect("nats store directory");
        let mut server = Self {
            port,
            dir,
            child: None,
        };
        server.restart();
        server
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts (again) on the same port and store, and waits until it answers.
    pub fn restart(&mut self) {
        self.kill();
        let child = Command::new("nats-server")
            .args(["--jetstream", "--addr", "127.0.0.1", "--port"])
            .arg(self.port.to_string())
            .arg("--store_dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server on PATH (run `just up` or install nats-server)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
