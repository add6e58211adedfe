//! Kafka over TLS and SASL, end to end: the real `recon-worker run`, configured only
//! through the contract's variables (`RECON_KAFKA_BROKERS`, `RECON_KAFKA_PROP_*`),
//! against the broker's secure listeners from `scripts/dev-services.sh` (see
//! [`common::secure_kafka`]), with certificate and host name verification on.
//!
//! A stream is produced over the plain listener (the producer is not under test) and
//! reconciled by a worker that reads it over SASL_SSL with SCRAM-SHA-512. Then each way
//! such a configuration goes wrong — a wrong password, a CA that did not sign the
//! broker's certificate, a name the certificate does not list — must stop the start
//! within seconds with exit code 2 (the code of an invalid configuration: the same
//! start would be refused the same way), a message naming the cause, and no secret in
//! anything the worker printed.

mod common;

use std::time::Duration;

use common::*;
use sqlx::PgPool;

const WITHIN: Duration = Duration::from_secs(90);

/// The start-up check waits this long for an unreachable broker (and exits 1): a
/// refusal must end the start well before it.
const UNREACHABLE_PATIENCE: Duration = Duration::from_secs(10);

/// The contract's variables for TLS without SASL, verification on.
fn ssl_env(brokers: &str, ca_file: &str) -> Vec<(String, String)> {
    [
        ("RECON_KAFKA_BROKERS", brokers),
        ("RECON_KAFKA_PROP_SECURITY_PROTOCOL", "SSL"),
        ("RECON_KAFKA_PROP_SSL_CA_LOCATION", ca_file),
        (
            "RECON_KAFKA_PROP_ENABLE_SSL_CERTIFICATE_VERIFICATION",
            "true",
        ),
        (
            "RECON_KAFKA_PROP_SSL_ENDPOINT_IDENTIFICATION_ALGORITHM",
            "https",
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

/// The contract's variables for SASL_SSL with SCRAM-SHA-512: TLS as [`ssl_env`], plus
/// the login.
fn sasl_ssl_env(kafka: &SecureKafka, password: &str, ca_file: &str) -> Vec<(String, String)> {
    let mut env = ssl_env(&kafka.sasl_ssl_brokers, ca_file);
    env.retain(|(name, _)| name != "RECON_KAFKA_PROP_SECURITY_PROTOCOL");
    for (name, value) in [
        ("RECON_KAFKA_PROP_SECURITY_PROTOCOL", "SASL_SSL"),
        ("RECON_KAFKA_PROP_SASL_MECHANISM", "SCRAM-SHA-512"),
        ("RECON_KAFKA_PROP_SASL_USERNAME", kafka.username.as_str()),
        ("RECON_KAFKA_PROP_SASL_PASSWORD", password),
    ] {
        env.push((name.to_owned(), value.to_owned()));
    }
    env
}

fn refs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

fn path(path: &std::path::Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

#[sqlx::test(migrations = false)]
async fn a_stream_is_reconciled_over_sasl_ssl_with_verification_on(pool: PgPool) {
    let kafka = secure_kafka();
    let world = World::new(pool, 3).await;
    let plan = world.plan(60, 24, full_mix());
    let (records, truth) = generate(&plan);
    world.produce(&records).await;

    let env = sasl_ssl_env(&kafka, &kafka.password, path(&kafka.ca_file));
    let mut worker = world.spawn_worker("sasl-ssl", &refs(&env));
    world.await_truth(&truth, WITHIN).await;

    worker.signal("TERM");
    let status = worker.wait(Duration::from_secs(40));
    let log = worker.log_text();
    assert!(status.success(), "SIGTERM exits 0: {status:?}\n{log}");
    // It really went over SASL_SSL, with the secret shown as such in the logged config.
    assert!(
        log.contains(&format!("brokers: \"{}\"", kafka.sasl_ssl_brokers))
            && log.contains("\"security.protocol\": \"SASL_SSL\"")
            && log.contains("\"sasl.password\": \"***\""),
        "{log}"
    );
    assert!(
        !log.contains(&kafka.password),
        "password in the log:\n{log}"
    );
}

/// Runs a worker that must be refused at start; returns its last line (the error).
fn assert_refused_at_start(
    world: &World,
    name: &str,
    env: &[(String, String)],
    secret: &str,
) -> String {
    let exited = world.run_to_exit(name, &refs(env), Duration::from_secs(60));
    let stderr = &exited.stderr;
    assert_eq!(
        exited.status.code(),
        Some(2),
        "a refusal exits 2 (1 is an outage):\n{stderr}"
    );
    // From the first contact with Kafka (after the migrations) to the exit.
    let consumer_started = stderr
        .lines()
        .find(|line| line.contains("migrations applied"))
        .and_then(|line| line.split_whitespace().next())
        .and_then(|at| chrono::DateTime::parse_from_rfc3339(at).ok())
        .unwrap_or_else(|| panic!("no \"migrations applied\" line:\n{stderr}"));
    let took = (exited.at - consumer_started.to_utc())
        .to_std()
        .unwrap_or_default();
    eprintln!("{name}: refused {took:?} after the consumer started");
    assert!(
        took < UNREACHABLE_PATIENCE - Duration::from_secs(2),
        "refused only after {took:?}: a refusal must end the start at once:\n{stderr}"
    );
    for (stream, text) in [("stdout", &exited.stdout), ("stderr", stderr)] {
        assert!(
            !text.contains(secret),
            "the password is in {stream}:\n{text}"
        );
    }
    stderr
        .lines()
        .rfind(|line| line.starts_with("recon-worker: "))
        .unwrap_or_else(|| panic!("no error line:\n{stderr}"))
        .to_owned()
}

#[sqlx::test(migrations = false)]
async fn a_wrong_password_ends_the_start_naming_authentication(pool: PgPool) {
    let kafka = secure_kafka();
    let world = World::new(pool, 1).await;
    let wrong = format!("not-{}", kafka.password);
    let env = sasl_ssl_env(&kafka, &wrong, path(&kafka.ca_file));
    let error = assert_refused_at_start(&world, "wrong-password", &env, &wrong);
    assert!(
        error.contains("Kafka authentication failed")
            && error.contains("SASL authentication error")
            && error.contains("SCRAM-SHA-512")
            && error.contains("RECON_KAFKA_PROP_SASL_PASSWORD"),
        "{error}"
    );
}

#[sqlx::test(migrations = false)]
async fn an_untrusted_ca_ends_the_start_naming_certificate_verification(pool: PgPool) {
    let kafka = secure_kafka();
    let world = World::new(pool, 1).await;
    // A CA of its own, which signed nothing the broker presents.
    let other_ca = world.log_dir.join("untrusted-ca.pem");
    let made = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=recon-worker untrusted test CA", "-keyout"])
        .arg(world.log_dir.join("untrusted-ca.key"))
        .arg("-out")
        .arg(&other_ca)
        .output()
        .expect("openssl");
    assert!(made.status.success(), "{made:?}");
    let env = sasl_ssl_env(&kafka, &kafka.password, path(&other_ca));
    let error = assert_refused_at_start(&world, "untrusted-ca", &env, &kafka.password);
    assert!(
        error.contains("TLS with the Kafka broker failed: certificate verify failed")
            && error.contains("RECON_KAFKA_PROP_SSL_CA_LOCATION")
            && !error.contains("hostname mismatch"),
        "{error}"
    );
}

#[sqlx::test(migrations = false)]
async fn a_hostname_mismatch_ends_the_start_naming_it(pool: PgPool) {
    let kafka = secure_kafka();
    let world = World::new(pool, 1).await;
    let ca = path(&kafka.ca_file);
    // The SSL listener's certificate, signed by the trusted CA, names 127.0.0.1 only.
    // Through that address the worker starts: the CA is right, verification is on...
    let mut control = world.spawn_worker("ssl-by-address", &refs(&ssl_env(&kafka.ssl_brokers, ca)));
    let started = std::time::Instant::now();
    while !control.log_text().contains("partition pairs assigned") {
        assert!(
            control.child.try_wait().expect("try_wait").is_none() && started.elapsed() < WITHIN,
            "the worker did not start over SSL by address:\n{}",
            control.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    control.signal("TERM");
    assert!(control.wait(Duration::from_secs(40)).success());
    // ...and through `localhost`, the same listener and CA, the name does not match.
    let port = kafka.ssl_brokers.rsplit(':').next().expect("host:port");
    let env = ssl_env(&format!("localhost:{port}"), ca);
    let error = assert_refused_at_start(&world, "hostname-mismatch", &env, &kafka.password);
    assert!(
        error.contains("TLS with the Kafka broker failed: hostname mismatch")
            && error.contains("\"localhost\"")
            && error.contains("RECON_KAFKA_BROKERS"),
        "{error}"
    );
}

#[sqlx::test(migrations = false)]
async fn security_properties_librdkafka_refuses_end_the_start_with_exit_2(pool: PgPool) {
    let kafka = secure_kafka();
    let world = World::new(pool, 1).await;
    for (name, variable, value, expected) in [
        (
            "unknown-mechanism",
            "RECON_KAFKA_PROP_SASL_MECHANISM",
            "SCRAM-SHA-999",
            "Unsupported hash function: SCRAM-SHA-999",
        ),
        (
            "unknown-protocol",
            "RECON_KAFKA_PROP_SECURITY_PROTOCOL",
            "SASL_TLS",
            "security.protocol",
        ),
    ] {
        let mut env = sasl_ssl_env(&kafka, &kafka.password, path(&kafka.ca_file));
        env.push((variable.to_owned(), value.to_owned()));
        let exited = world.run_to_exit(name, &refs(&env), Duration::from_secs(60));
        let stderr = &exited.stderr;
        assert_eq!(exited.status.code(), Some(2), "{name}:\n{stderr}");
        assert!(
            stderr.contains("librdkafka refused the Kafka configuration")
                && stderr.contains(expected)
                && !stderr.contains(&kafka.password),
            "{name}:\n{stderr}"
        );
    }
}
