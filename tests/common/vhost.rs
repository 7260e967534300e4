//! A RabbitMQ vhost of a test's own on the shared broker, made and deleted with
//! `rabbitmqctl`: for tests that need kiwiPy's default names, or limits of their own.

use std::process::Command;

/// A vhost, deleted (with everything in it) when dropped.
pub struct Vhost(String);

fn rabbitmqctl(args: &[&str]) {
    let status = Command::new("rabbitmqctl")
        .arg("-q")
        .args(args)
        .status()
        .expect("rabbitmqctl runs");
    assert!(status.success(), "rabbitmqctl {args:?}");
}

impl Vhost {
    /// A fresh vhost that the guest user may use.
    pub fn new() -> Vhost {
        let name = format!("kiwimq-test-{}", uuid::Uuid::new_v4().simple());
        rabbitmqctl(&["add_vhost", &name]);
        rabbitmqctl(&["set_permissions", "-p", &name, "guest", ".*", ".*", ".*"]);
        Vhost(name)
    }

    /// Sets the vhost's limits, as `rabbitmqctl set_vhost_limits` takes them:
    /// `{"max-queues": 4}`.
    pub fn limit(&self, limits: &str) {
        rabbitmqctl(&["set_vhost_limits", "-p", &self.0, limits]);
    }

    /// The vhost's name.
    pub fn name(&self) -> &str {
        &self.0
    }

    /// The URI of the local broker's vhost.
    pub fn uri(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:5672/{}", self.0)
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["-q", "delete_vhost", &self.0])
            .status();
    }
}
