//! A private RabbitMQ node for tests that stop and start a broker, so the shared broker
//! every other test uses is never touched. Needs root (the node runs as the `rabbitmq`
//! user, as the Debian package sets up).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::free_port;

/// A broker node of its own, on free ports, deleted when dropped.
pub struct Node {
    pub name: String,
    pub port: u16,
    dir: PathBuf,
    server: Child,
}

fn answers(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

impl Node {
    /// Starts a node and waits until it accepts AMQP connections.
    pub async fn start() -> Node {
        Node::start_with("", None).await
    }

    /// Starts a node with more `rabbitmq.conf` lines and, optionally, an `advanced.config`.
    pub async fn start_with(conf: &str, advanced: Option<&str>) -> Node {
        let id = &uuid::Uuid::new_v4().simple().to_string()[..12];
        let name = format!("kiwimq-{id}@localhost");
        let (port, dist) = (free_port(), free_port());
        let dir = std::env::temp_dir().join(format!("kiwimq-node-{id}"));
        for sub in ["mnesia", "log"] {
            std::fs::create_dir_all(dir.join(sub)).expect("the node's directories");
        }
        std::fs::write(dir.join("enabled_plugins"), "[].").unwrap();
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!("listeners.tcp.local = 127.0.0.1:{port}\n{conf}\n"),
        )
        .unwrap();
        std::fs::write(dir.join("advanced.config"), advanced.unwrap_or("[].")).unwrap();
        let owned = Command::new("chown")
            .args(["-R", "rabbitmq:rabbitmq"])
            .arg(&dir)
            .status()
            .expect("chown");
        assert!(
            owned.success(),
            "the node's directory must belong to rabbitmq (run as root)"
        );
        let output = std::fs::File::create(dir.join("server.out")).unwrap();
        let server = Command::new("rabbitmq-server")
            .env("RABBITMQ_NODENAME", &name)
            .env("RABBITMQ_NODE_PORT", port.to_string())
            .env("RABBITMQ_DIST_PORT", dist.to_string())
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq.conf"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", dir.join("advanced.config"))
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .stdin(Stdio::null())
            .stdout(output.try_clone().unwrap())
            .stderr(output)
            .spawn()
            .expect("rabbitmq-server runs");
        let node = Node {
            name,
            port,
            dir,
            server,
        };
        node.wait_until(true).await;
        node
    }

    /// An AMQP URI for this node.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Runs `rabbitmqctl` on this node, failing the test if it fails.
    pub fn ctl(&self, action: &str) {
        self.ctl_args(&[action]);
    }

    /// Runs `rabbitmqctl ARGS…` on this node, failing the test if it fails.
    pub fn ctl_args(&self, args: &[&str]) {
        let action = args.join(" ");
        let status = Command::new("rabbitmqctl")
            .args(["-q", "-n", &self.name])
            .args(args)
            .stdout(Stdio::null())
            .status()
            .expect("rabbitmqctl runs");
        assert!(
            status.success(),
            "rabbitmqctl {action} failed on {}",
            self.name
        );
    }

    async fn wait_until(&self, listening: bool) {
        let deadline = Instant::now() + Duration::from_secs(90);
        while answers(self.port) != listening {
            if Instant::now() > deadline {
                let out = std::fs::read_to_string(self.dir.join("server.out")).unwrap_or_default();
                panic!(
                    "node {} never got to listening={listening}:\n{out}",
                    self.name
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops the broker application (connections drop, transient queues go); the Erlang
    /// node stays up for [`start_app`](Node::start_app).
    pub async fn stop_app(&self) {
        self.ctl("stop_app");
        self.wait_until(false).await;
    }

    /// Starts the broker application again, recovering durable queues and persistent
    /// messages.
    pub async fn start_app(&self) {
        self.ctl("start_app");
        self.wait_until(true).await;
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["-q", "-n", &self.name, "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = self.server.kill();
        let _ = self.server.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
