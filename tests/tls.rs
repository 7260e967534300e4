//! `amqps://` against a private RabbitMQ node with a TLS listener that requires client
//! certificates, with a CA and certificates this test makes (rcgen): the server verified
//! against the given CA, the client's certificate presented, the server name checked —
//! and every way it can be wrong fails at connect with a clear error, never in plaintext.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use kiwimq::{ErrorKind, Rpc, Settings};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

use common::node::Node;
use common::{amqp_settings, free_port};

/// A CA, a server certificate for localhost and 127.0.0.1, a client certificate, and a
/// CA nobody trusts: PEM files in a directory the broker can read.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn make() -> Pki {
        let dir =
            std::env::temp_dir().join(format!("kiwimq-tls-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca_key = KeyPair::generate().unwrap();
        // Every certificate needs a name of its own: one whose subject is its issuer's
        // looks self-signed to the broker.
        let named = |names: Vec<String>, common_name: &str| {
            let mut params = CertificateParams::new(names).unwrap();
            params
                .distinguished_name
                .push(DnType::CommonName, common_name);
            params
        };
        let mut ca_params = named(vec![], "kiwimq test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let write = |name: &str, text: String| std::fs::write(dir.join(name), text).unwrap();
        write("ca.pem", ca.pem());
        for (name, names) in [
            (
                "server",
                vec!["localhost".to_owned(), "127.0.0.1".to_owned()],
            ),
            ("client", vec!["kiwimq-test-client".to_owned()]),
        ] {
            let key = KeyPair::generate().unwrap();
            let common_name = names[0].clone();
            let cert = named(names, &common_name).signed_by(&key, &issuer).unwrap();
            write(&format!("{name}.pem"), cert.pem());
            write(&format!("{name}.key"), key.serialize_pem());
        }
        let stranger_key = KeyPair::generate().unwrap();
        let mut stranger = named(vec![], "a CA nobody trusts");
        stranger.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        write(
            "stranger.pem",
            stranger.self_signed(&stranger_key).unwrap().pem(),
        );
        // The broker runs as its own user.
        let status = std::process::Command::new("chmod")
            .args(["-R", "a+rX"])
            .arg(&dir)
            .status()
            .unwrap();
        assert!(status.success());
        Pki { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A node with a TLS listener requiring a client certificate signed by the test's CA.
async fn tls_node(pki: &Pki) -> (Node, u16) {
    let port = free_port();
    let conf = format!(
        "listeners.ssl.default = 127.0.0.1:{port}\n\
         ssl_options.cacertfile = {}\n\
         ssl_options.certfile = {}\n\
         ssl_options.keyfile = {}\n\
         ssl_options.verify = verify_peer\n\
         ssl_options.fail_if_no_peer_cert = true\n",
        pki.path("ca.pem"),
        pki.path("server.pem"),
        pki.path("server.key"),
    );
    let node = Node::start_with(&conf, None).await;
    // The TLS listener may come up just after the plain one.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "no TLS listener on {port}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (node, port)
}

/// One RPC round trip over `settings`: the connection carries traffic, not just a handshake.
async fn round_trip(settings: Settings) {
    let server = settings
        .clone()
        .connect()
        .await
        .expect("the server connects over TLS");
    let client = settings
        .connect()
        .await
        .expect("the client connects over TLS");
    server
        .add_rpc_subscriber(Some("echo"), |r: Rpc<String>| async move { Ok(r.body) })
        .await
        .unwrap();
    let reply: String = client
        .rpc_send("echo", &"over tls".to_owned())
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(reply, "over tls");
    client.close().await.unwrap();
    server.close().await.unwrap();
}

/// What connecting with `settings` fails with.
async fn refused(settings: Settings) -> kiwimq::Error {
    let settings = settings.with_connect_timeout(Duration::from_secs(10));
    match settings.connect().await {
        Ok(_) => panic!("connected where it must not"),
        Err(error) => error,
    }
}

#[actix::test]
async fn amqps_verifies_the_broker_presents_a_client_certificate_and_never_falls_back() {
    let pki = Pki::make();
    let (node, port) = tls_node(&pki).await;
    let query = format!(
        "cacertfile={}&certfile={}&keyfile={}",
        pki.path("ca.pem"),
        pki.path("client.pem"),
        pki.path("client.key")
    );
    let base = format!("amqps://guest:guest@localhost:{port}/%2f");

    // From the URI query, as RabbitMQ's URI spec names the options.
    round_trip(amqp_settings(&format!("{base}?{query}"))).await;
    // From Settings, with 127.0.0.1 as the address and the certificate's name given; the
    // connection the broker sees is TLS, with our client certificate.
    let by_settings = amqp_settings(&format!("amqps://guest:guest@127.0.0.1:{port}/%2f"))
        .with_tls_ca_file(pki.path("ca.pem"))
        .with_tls_client_cert(pki.path("client.pem"), pki.path("client.key"))
        .with_tls_server_name("localhost");
    let comm = by_settings.clone().connect().await.unwrap();
    let connections = std::process::Command::new("rabbitmqctl")
        .args([
            "-q",
            "-n",
            &node.name,
            "list_connections",
            "ssl",
            "peer_cert_subject",
        ])
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&connections.stdout);
    assert!(
        listed.contains("true") && listed.contains("kiwimq-test-client"),
        "the broker sees a TLS connection with our client certificate:\n{listed}"
    );
    comm.close().await.unwrap();
    round_trip(by_settings).await;

    // No client certificate: the broker refuses the handshake.
    let error = refused(amqp_settings(&format!(
        "{base}?cacertfile={}",
        pki.path("ca.pem")
    )))
    .await;
    assert!(matches!(error.kind(), ErrorKind::Connection(_)), "{error}");

    // A broker certificate from a CA we do not trust (the system's roots, or another CA).
    let error = refused(amqp_settings(&format!(
        "{base}?certfile={}&keyfile={}",
        pki.path("client.pem"),
        pki.path("client.key")
    )))
    .await;
    assert!(matches!(error.kind(), ErrorKind::Connection(_)), "{error}");
    assert!(error.to_string().contains("certificate"), "{error}");
    let error = refused(amqp_settings(&format!(
        "{base}?cacertfile={}&certfile={}&keyfile={}",
        pki.path("stranger.pem"),
        pki.path("client.pem"),
        pki.path("client.key")
    )))
    .await;
    assert!(error.to_string().contains("UnknownIssuer"), "{error}");

    // The right CA, but a name the certificate does not carry.
    let error = refused(amqp_settings(&format!(
        "{base}?{query}&server_name_indication=elsewhere.example"
    )))
    .await;
    assert!(matches!(error.kind(), ErrorKind::Connection(_)), "{error}");
    assert!(error.to_string().contains("not valid for name"), "{error}");

    // verify_none accepts the unknown CA (still encrypted, still with our certificate).
    round_trip(amqp_settings(&format!(
        "{base}?cacertfile={}&certfile={}&keyfile={}&verify=verify_none",
        pki.path("stranger.pem"),
        pki.path("client.pem"),
        pki.path("client.key")
    )))
    .await;

    // amqps:// to the plain AMQP port: a failed handshake, not a plaintext session.
    let error = refused(amqp_settings(&format!(
        "amqps://guest:guest@localhost:{}/%2f?{query}",
        node.port
    )))
    .await;
    assert!(matches!(error.kind(), ErrorKind::Connection(_)), "{error}");
    assert!(error.to_string().contains("TLS"), "{error}");
}

#[actix::test]
async fn tls_options_that_cannot_work_are_config_errors_before_any_connection() {
    let pki = Pki::make();
    let missing = Path::new("/nonexistent/ca.pem");
    let cases = [
        (
            amqp_settings("amqp://guest:guest@127.0.0.1:5672/%2f")
                .with_tls_ca_file(pki.path("ca.pem")),
            "plain amqp://",
        ),
        (
            amqp_settings("amqps://guest:guest@127.0.0.1:5671/%2f").with_tls_ca_file(missing),
            "/nonexistent/ca.pem",
        ),
        (
            amqp_settings(&format!(
                "amqps://guest:guest@127.0.0.1:5671/%2f?certfile={}",
                pki.path("client.pem")
            )),
            "go together",
        ),
        (
            amqp_settings("amqps://guest:guest@127.0.0.1:5671/%2f?verify=sometimes"),
            "verify_peer or verify_none",
        ),
        // A failover from TLS to plaintext is never configured by accident.
        (
            amqp_settings("amqps://guest:guest@127.0.0.1:5671/%2f").with_nodes([
                "amqps://guest:guest@127.0.0.1:5671/%2f",
                "amqp://guest:guest@127.0.0.1:5672/%2f",
            ]),
            "mix amqps:// and amqp://",
        ),
    ];
    for (settings, says) in cases {
        let error = refused(settings).await;
        assert!(matches!(error.kind(), ErrorKind::Config(_)), "{error}");
        assert!(
            error.to_string().contains(says),
            "{error} should say {says}"
        );
    }
}
