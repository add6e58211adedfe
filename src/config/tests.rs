//! The configuration's tests: defaults, errors naming variable and value, refused and
//! secret Kafka properties, and the redaction of passwords in every way a connection
//! string can carry one.

use super::*;

fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

const URL: (&str, &str) = ("DATABASE_URL", "postgres://app:s3cret@db:5432/recon");

#[test]
fn defaults_follow_the_contract() {
    let config = Config::from_vars(vars(&[URL])).expect("valid");
    assert_eq!(config.brokers, "127.0.0.1:9092");
    assert_eq!(config.group_id, "recon-worker");
    assert_eq!(config.payments_topic, "payments");
    assert_eq!(config.settlements_topic, "settlements");
    assert_eq!(config.matching, MatchConfig::default());
    assert_eq!(
        config.matching.settlement_deadline,
        Duration::from_secs(72 * 3600)
    );
    assert_eq!(config.matching.idle_timeout, Duration::from_secs(30));
    assert_eq!(config.log_format, LogFormat::Text);
    assert_eq!(config.max_future_skew, Duration::from_secs(24 * 3600));
    assert_eq!(
        config.decode_limits(),
        crate::event::Limits {
            max_bytes: 64 * 1024,
            max_future_skew: 24 * 3600 * 1_000_000,
        }
    );
}

#[test]
fn payouts_are_off_unless_their_topic_is_set() {
    let off = Config::from_vars(vars(&[URL])).expect("valid");
    assert_eq!(off.payouts, None);
    let empty = Config::from_vars(vars(&[URL, ("RECON_PAYOUTS_TOPIC", "")])).expect("valid");
    assert_eq!(empty.payouts, None);
    // The grace is only read with the topic: a stale value cannot stop a worker
    // that does not reconcile payouts.
    let stale = Config::from_vars(vars(&[URL, ("RECON_PAYOUT_GRACE", "soon")])).expect("valid");
    assert_eq!(stale.payouts, None);
    let on = Config::from_vars(vars(&[URL, ("RECON_PAYOUTS_TOPIC", "payouts")])).expect("valid");
    assert_eq!(
        on.payouts,
        Some(PayoutsConfig {
            topic: "payouts".into(),
            grace: Duration::from_secs(24 * 3600),
        })
    );
    let graced = Config::from_vars(vars(&[
        URL,
        ("RECON_PAYOUTS_TOPIC", "payouts"),
        ("RECON_PAYOUT_GRACE", "90m"),
    ]))
    .expect("valid");
    assert_eq!(
        graced.payouts.map(|p| p.grace),
        Some(Duration::from_secs(5400))
    );
}

#[test]
fn payout_settings_are_checked() {
    for (variable, value, payouts_topic) in [
        ("RECON_PAYOUT_GRACE", "soon", "payouts"),
        ("RECON_PAYOUT_GRACE", "3651d", "payouts"),
        ("RECON_PAYOUTS_TOPIC", " payouts", " payouts"),
        ("RECON_PAYOUTS_TOPIC", "payments", "payments"),
        ("RECON_PAYOUTS_TOPIC", "settlements", "settlements"),
    ] {
        let mut given = vec![URL, ("RECON_PAYOUTS_TOPIC", payouts_topic)];
        if variable == "RECON_PAYOUT_GRACE" {
            given.push((variable, value));
        }
        let error = Config::from_vars(vars(&given))
            .expect_err(value)
            .to_string();
        assert!(
            error.starts_with(&format!("{variable}={value:?} is invalid")),
            "{error}"
        );
    }
}

#[test]
fn the_future_skew_is_a_duration() {
    let config = Config::from_vars(vars(&[URL, ("RECON_MAX_FUTURE_SKEW", "90m")])).expect("valid");
    assert_eq!(config.max_future_skew, Duration::from_secs(5400));
    assert_eq!(config.decode_limits().max_future_skew, 5_400_000_000);
}

#[test]
fn kafka_properties_the_worker_depends_on_are_refused() {
    for (variable, value, property) in [
        (
            "RECON_KAFKA_PROP_ENABLE_AUTO_COMMIT",
            "true",
            "enable.auto.commit",
        ),
        (
            "RECON_KAFKA_PROP_AUTO_COMMIT_ENABLE",
            "true",
            "auto.commit.enable",
        ),
        (
            "RECON_KAFKA_PROP_ENABLE_AUTO_OFFSET_STORE",
            "true",
            "enable.auto.offset.store",
        ),
        (
            "RECON_KAFKA_PROP_ISOLATION_LEVEL",
            "read_uncommitted",
            "isolation.level",
        ),
        (
            "RECON_KAFKA_PROP_PARTITION_ASSIGNMENT_STRATEGY",
            "roundrobin",
            "partition.assignment.strategy",
        ),
        (
            "RECON_KAFKA_PROP_GROUP_PROTOCOL",
            "consumer",
            "group.protocol",
        ),
        (
            "RECON_KAFKA_PROP_AUTO_OFFSET_RESET",
            "latest",
            "auto.offset.reset",
        ),
        ("RECON_KAFKA_PROP_GROUP_ID", "other", "RECON_GROUP_ID"),
        (
            "RECON_KAFKA_PROP_BOOTSTRAP_SERVERS",
            "k:9092",
            "RECON_KAFKA_BROKERS",
        ),
        (
            "RECON_KAFKA_PROP_METADATA_BROKER_LIST",
            "k:9092",
            "RECON_KAFKA_BROKERS",
        ),
    ] {
        let err = Config::from_vars(vars(&[URL, (variable, value)])).expect_err(variable);
        assert!(matches!(err, ConfigError::Refused { .. }), "{err:?}");
        let text = err.to_string();
        assert!(
            text.contains(variable) && text.contains(value) && text.contains(property),
            "{text}"
        );
    }
    // Tuning stays open.
    let config = Config::from_vars(vars(&[
        URL,
        ("RECON_KAFKA_PROP_FETCH_WAIT_MAX_MS", "50"),
        ("RECON_KAFKA_PROP_CLIENT_ID", "recon-eu-1"),
    ]))
    .expect("valid");
    assert_eq!(config.kafka_properties["fetch.wait.max.ms"], "50");
}

#[test]
fn secret_kafka_properties_are_never_shown() {
    let secrets = [
        ("RECON_KAFKA_PROP_SASL_PASSWORD", "pw-Alpha"),
        ("RECON_KAFKA_PROP_SSL_KEY_PASSWORD", "pw-Bravo"),
        (
            "RECON_KAFKA_PROP_SASL_OAUTHBEARER_CONFIG",
            "principal=x scope=Charlie",
        ),
        (
            "RECON_KAFKA_PROP_SASL_OAUTHBEARER_CLIENT_SECRET",
            "pw-Delta",
        ),
        ("RECON_KAFKA_PROP_SSL_KEY_PEM", "pw-Echo"),
        ("RECON_KAFKA_PROP_SSL__KEY", "pw-Foxtrot"),
        (
            "RECON_KAFKA_PROP_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL",
            "https://idp/Golf",
        ),
        ("RECON_KAFKA_PROP_SSL_KEYSTORE_PASSWORD", "pw-Hotel"),
    ];
    let mut all = vec![URL];
    all.extend(secrets);
    let config = Config::from_vars(vars(&all)).expect("valid");
    let shown = format!("{config:?}");
    for (_, secret) in secrets {
        assert!(!shown.contains(secret), "{secret} in {shown}");
    }
    assert!(shown.contains("sasl.password"), "{shown}");
    // A malformed name that looks like a secret's: its value is not echoed.
    let err = Config::from_vars(vars(&[URL, ("RECON_KAFKA_PROP_sasl.password", "pw-India")]))
        .expect_err("malformed")
        .to_string();
    assert!(
        err.contains("RECON_KAFKA_PROP_sasl.password") && !err.contains("pw-India"),
        "{err}"
    );
}

#[test]
fn database_url_is_required() {
    let err = Config::from_vars(vars(&[])).expect_err("missing");
    assert!(err.to_string().contains("DATABASE_URL"), "{err}");
}

#[test]
fn errors_name_variable_value_and_expectation() {
    for (variable, value) in [
        ("RECON_SETTLEMENT_DEADLINE", "3 days-ish"),
        ("RECON_ORPHAN_TIMEOUT", "-1h"),
        ("RECON_IDLE_TIMEOUT", "soon"),
        ("RECON_AMOUNT_TOLERANCE_MINOR", "-5"),
        ("RECON_WINDOW_MAX_ITEMS", "0"),
        ("RECON_METRICS_ADDR", "port 80"),
        ("RECON_LOG_FORMAT", "xml"),
        ("RECON_KAFKA_PROP_session.timeout.ms", "6000"),
        ("RECON_INSTANCE_ID", "pod/0"),
        ("RECON_GROUP_PROTOCOL", "cooperative"),
        ("RECON_MAX_FUTURE_SKEW", "tomorrow"),
        ("RECON_MAX_FUTURE_SKEW", "0s"),
        ("RECON_MAX_FUTURE_SKEW", "4000d"),
    ] {
        let err = Config::from_vars(vars(&[URL, (variable, value)]))
            .expect_err(variable)
            .to_string();
        assert!(
            err.contains(variable) && err.contains(value) && err.contains("expected"),
            "{err}"
        );
    }
}

#[test]
fn durations_and_kafka_properties_are_parsed() {
    let config = Config::from_vars(vars(&[
        URL,
        ("RECON_SETTLEMENT_DEADLINE", "90s"),
        ("RECON_ORPHAN_TIMEOUT", "15m"),
        ("RECON_KAFKA_PROP_SESSION_TIMEOUT_MS", "6000"),
        ("RECON_KAFKA_PROP_SASL_PASSWORD", "kafka-secret"),
        ("RECON_KAFKA_PROP_SOME__ODD_NAME", "x"),
    ]))
    .expect("valid");
    assert_eq!(config.matching.settlement_deadline, Duration::from_secs(90));
    assert_eq!(config.matching.orphan_timeout, Duration::from_secs(900));
    assert_eq!(config.kafka_properties["session.timeout.ms"], "6000");
    assert_eq!(config.kafka_properties["some_odd.name"], "x");
    let shown = format!("{config:?}");
    assert!(
        !shown.contains("s3cret") && !shown.contains("kafka-secret"),
        "{shown}"
    );
}

#[test]
fn instance_id_is_optional_and_kafka_shaped() {
    let unset = Config::from_vars(vars(&[URL])).expect("valid");
    assert_eq!(unset.instance_id, None);
    let empty = Config::from_vars(vars(&[URL, ("RECON_INSTANCE_ID", "")])).expect("valid");
    assert_eq!(empty.instance_id, None);
    let pod = Config::from_vars(vars(&[URL, ("RECON_INSTANCE_ID", "recon-worker-7f9c-x2")]))
        .expect("valid");
    assert_eq!(pod.instance_id.as_deref(), Some("recon-worker-7f9c-x2"));
    let too_long = "a".repeat(250);
    assert!(Config::from_vars(vars(&[URL, ("RECON_INSTANCE_ID", &too_long)])).is_err());
}

#[test]
fn the_scrubber_blanks_every_secret_value() {
    let config = Config::from_vars(vars(&[
        ("DATABASE_URL", "postgres://app:p%40ss-Word@db/x"),
        ("RECON_KAFKA_PROP_SASL_PASSWORD", "kafka-Secret"),
        ("RECON_KAFKA_PROP_SESSION_TIMEOUT_MS", "6000"),
    ]))
    .expect("valid");
    let text = "config error: sasl.password kafka-Secret; p@ss-Word, p%40ss-Word; 6000";
    assert_eq!(
        config.scrubber.scrub(text),
        "config error: sasl.password ***; ***, ***; 6000"
    );
}

#[test]
fn passwords_with_url_delimiters_are_hidden() {
    for (url, shown) in [
        ("postgres://u:pa/ss@h:1/db", "postgres://u:***@h:1/db"),
        ("postgres://u:pa?ss@h/db", "postgres://u:***@h/db"),
        ("postgres://u:pa#ss@h/db", "postgres://u:***@h/db"),
        ("postgres://u:p@ss@h/db", "postgres://u:***@h/db"),
        ("postgres://u:p:a@h/db", "postgres://u:***@h/db"),
        ("postgres://u:@h/db", "postgres://u:***@h/db"),
        ("postgres://u@h:5432/db", "postgres://u@h:5432/db"),
        (
            "postgresql://h/db?PassWord=x&sslmode=require",
            "postgresql://h/db?PassWord=***",
        ),
        (
            "postgres://h/db?pass%77ord=x",
            "postgres://h/db?pass%77ord=***",
        ),
        (
            "postgres://h/db?sslpassword=x",
            "postgres://h/db?sslpassword=***",
        ),
        (
            "postgres://h/db?password=a@b&c",
            "postgres://h/db?password=***",
        ),
        (
            "host=h password=secret dbname=d",
            "host=h password=*** dbname=d",
        ),
        (
            "host=h password = 'se cr\\'et' dbname=d",
            "host=h password = *** dbname=d",
        ),
        ("host=h password='unterminated", "host=h password=***"),
        ("host=h password", "host=h ***"),
        ("host=h password=a://b", "host=h password=***"),
    ] {
        assert_eq!(redact_url(url), shown, "{url}");
    }
}

/// How a password is written into a generated URL.
#[derive(Debug, Clone, Copy)]
enum Placement {
    Raw,
    Encoded,
    Query,
    QueryEncoded,
    Conninfo,
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

    /// Whatever a password holds and however it is written, nothing of it is shown:
    /// generated passwords always hold an upper-case letter and the rest of every
    /// URL is lower case, so any upper-case letter in the output is a leak.
    #[test]
    fn no_password_reaches_the_redacted_text(
        user in "[a-z]{0,6}",
        host in "[a-z]{1,8}(:[0-9]{1,5})?",
        db in "(/[a-z]{0,8})?",
        before in "(\\?([a-z]{1,6}=[a-z@]{0,4}&){0,2})?",
        password in "[A-Z0-9/?@#:&=%+ ;'\\\\!$.,~-]{0,8}[G-Z][A-Z0-9/?@#:&=%+ ;'\\\\!$.,~-]{0,8}",
        placement in proptest::prop_oneof![
            proptest::strategy::Just(Placement::Raw),
            proptest::strategy::Just(Placement::Encoded),
            proptest::strategy::Just(Placement::Query),
            proptest::strategy::Just(Placement::QueryEncoded),
            proptest::strategy::Just(Placement::Conninfo),
        ],
        after in "(&[a-z]{1,6}=[a-z]{0,4}){0,2}",
    ) {
        let encoded: String = password
            .bytes()
            .map(|b| if b.is_ascii_alphanumeric() { (b as char).to_string() } else { format!("%{b:02X}") })
            .collect();
        let query_start = if before.is_empty() { "?" } else { "&" };
        let url = match placement {
            Placement::Raw => format!("postgres://{user}:{password}@{host}{db}{before}"),
            Placement::Encoded => format!("postgres://{user}:{encoded}@{host}{db}{before}"),
            Placement::Query => format!("postgres://{user}@{host}{db}{before}{query_start}password={password}{after}"),
            Placement::QueryEncoded => format!("postgres://{host}{db}{before}{query_start}password={encoded}{after}"),
            Placement::Conninfo => {
                let quoted = password.replace('\\', "\\\\").replace('\'', "\\'");
                format!("host={host} user={user} password='{quoted}' dbname=d")
            }
        };
        let shown = redact_url(&url);
        proptest::prop_assert!(
            !shown.chars().any(|c| c.is_ascii_uppercase()),
            "{url:?} shown as {shown:?}"
        );
        // Hiding must not swallow everything: the host stays readable unless an
        // `@` or a password sits before it.
        if matches!(placement, Placement::Encoded) && !before.contains('@') {
            proptest::prop_assert!(shown.contains(&host), "{url:?} shown as {shown:?}");
        }
    }
}

#[test]
fn bad_database_url_does_not_echo_the_password() {
    let err = Config::from_vars(vars(&[("DATABASE_URL", "mysql://app:s3cret@db/x")]))
        .map(|_| ())
        .err();
    // sqlx may accept odd schemes lazily; if it rejects, the password must be hidden.
    if let Some(err) = err {
        assert!(!err.to_string().contains("s3cret"), "{err}");
    }
    assert_eq!(
        redact_url("postgres://u:p%40ss@h:1/db?sslmode=require&password=x"),
        "postgres://u:***@h:1/db?sslmode=require&password=***"
    );
    assert_eq!(redact_url("postgres://h/db"), "postgres://h/db");
}

/// A file in a fresh temporary directory holding `content`; the directory goes when
/// the returned guard is dropped.
struct SecretFile {
    dir: std::path::PathBuf,
    path: String,
}

impl SecretFile {
    fn new(content: &[u8]) -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("recon-config-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("secret");
        std::fs::write(&path, content).expect("write secret");
        Self {
            path: path.to_string_lossy().into_owned(),
            dir,
        }
    }
}

impl Drop for SecretFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn the_database_url_may_be_read_from_a_file_without_its_line_break() {
    for ending in ["", "\n", "\r\n", "\n\n"] {
        let file =
            SecretFile::new(format!("postgres://app:s3cret-File@db:5432/recon{ending}").as_bytes());
        let config = Config::from_vars(vars(&[("DATABASE_URL_FILE", &file.path)])).expect("valid");
        assert_eq!(config.database.get_host(), "db");
        assert_eq!(config.database.get_database(), Some("recon"));
        assert_eq!(config.database_display, "postgres://app:***@db:5432/recon");
        let shown = format!("{config:?}");
        assert!(!shown.contains("s3cret-File"), "{shown}");
        assert_eq!(config.scrubber.scrub("auth s3cret-File"), "auth ***");
    }
}

#[test]
fn a_secret_and_its_file_both_set_is_an_error_naming_both() {
    let file = SecretFile::new(b"postgres://app:s3cret-File@db/recon\n");
    let err = Config::from_vars(vars(&[URL, ("DATABASE_URL_FILE", &file.path)]))
        .expect_err("both set")
        .to_string();
    assert_eq!(
        err,
        "DATABASE_URL and DATABASE_URL_FILE are both set: set only one"
    );
    let err = Config::from_vars(vars(&[
        URL,
        ("RECON_KAFKA_PROP_SASL_PASSWORD", "kafka-Secret"),
        ("RECON_KAFKA_PROP_SASL_PASSWORD_FILE", &file.path),
    ]))
    .expect_err("both set")
    .to_string();
    assert_eq!(
        err,
        "RECON_KAFKA_PROP_SASL_PASSWORD and RECON_KAFKA_PROP_SASL_PASSWORD_FILE are both set: set only one"
    );
    // An empty variable beside its file counts as not set (a template's blank).
    let config = Config::from_vars(vars(&[
        ("DATABASE_URL", ""),
        ("DATABASE_URL_FILE", &file.path),
    ]))
    .expect("the file's URL");
    assert_eq!(config.database.get_database(), Some("recon"));
}

#[test]
fn an_unreadable_secret_file_is_an_error_naming_variable_and_path_not_content() {
    let missing = "/nonexistent/recon/database-url";
    let err = Config::from_vars(vars(&[("DATABASE_URL_FILE", missing)]))
        .expect_err("missing file")
        .to_string();
    assert!(
        err.starts_with(&format!(
            "DATABASE_URL_FILE={missing:?}: cannot read the file: "
        )),
        "{err}"
    );
    // Not UTF-8 (a binary key, a wrong mount): the error says so, without the bytes.
    let binary = SecretFile::new(b"pw-Kilo\xff\xfe");
    for variable in ["DATABASE_URL_FILE", "RECON_KAFKA_PROP_SASL_PASSWORD_FILE"] {
        let mut pairs = vec![(variable, binary.path.as_str())];
        if variable != "DATABASE_URL_FILE" {
            pairs.push(URL);
        }
        let err = Config::from_vars(vars(&pairs))
            .expect_err(variable)
            .to_string();
        assert!(
            err.contains(variable) && err.contains(&binary.path) && !err.contains("pw-Kilo"),
            "{err}"
        );
    }
    // A directory, and an empty file.
    let dir = SecretFile::new(b"");
    let parent = std::path::Path::new(&dir.path)
        .parent()
        .expect("parent")
        .to_string_lossy()
        .into_owned();
    let err = Config::from_vars(vars(&[("DATABASE_URL_FILE", &parent)]))
        .expect_err("a directory")
        .to_string();
    assert!(
        err.contains("DATABASE_URL_FILE") && err.contains(&parent),
        "{err}"
    );
    let err = Config::from_vars(vars(&[("DATABASE_URL_FILE", &dir.path)]))
        .expect_err("empty")
        .to_string();
    assert!(
        err.contains("DATABASE_URL_FILE") && err.contains(&dir.path) && err.contains("empty"),
        "{err}"
    );
}

#[test]
fn kafka_properties_may_be_read_from_files_and_are_never_shown() {
    let password = SecretFile::new(b"kafka-Pass\n");
    let username = SecretFile::new(b"recon-User\n");
    let config = Config::from_vars(vars(&[
        URL,
        ("RECON_KAFKA_PROP_SASL_PASSWORD_FILE", &password.path),
        ("RECON_KAFKA_PROP_SASL_USERNAME_FILE", &username.path),
        // librdkafka's own `*.file` properties take a path: not read by the worker.
        (
            "RECON_KAFKA_PROP_SASL_OAUTHBEARER_ASSERTION_FILE",
            "/var/run/assertion.jwt",
        ),
        ("RECON_KAFKA_PROP_SESSION_TIMEOUT_MS", "6000"),
    ]))
    .expect("valid");
    assert_eq!(config.kafka_properties["sasl.password"], "kafka-Pass");
    assert_eq!(config.kafka_properties["sasl.username"], "recon-User");
    assert_eq!(
        config.kafka_properties["sasl.oauthbearer.assertion.file"],
        "/var/run/assertion.jwt"
    );
    assert!(!config.kafka_properties.contains_key("sasl.password.file"));
    let shown = format!("{config:?}");
    assert!(
        !shown.contains("kafka-Pass") && !shown.contains("recon-User") && shown.contains("6000"),
        "{shown}"
    );
    assert_eq!(
        config.scrubber.scrub("kafka-Pass recon-User 6000"),
        "*** *** 6000"
    );
    // A refused property is refused from a file too, named by its variable.
    let group = SecretFile::new(b"other-group\n");
    let err = Config::from_vars(vars(&[
        URL,
        ("RECON_KAFKA_PROP_GROUP_ID_FILE", &group.path),
    ]))
    .expect_err("refused")
    .to_string();
    assert!(
        err.contains("RECON_KAFKA_PROP_GROUP_ID_FILE") && !err.contains("other-group"),
        "{err}"
    );
    let missing = "/nonexistent/recon/sasl-password";
    let err = Config::from_vars(vars(&[
        URL,
        ("RECON_KAFKA_PROP_SASL_PASSWORD_FILE", missing),
    ]))
    .expect_err("missing file")
    .to_string();
    assert!(
        err.starts_with(&format!(
            "RECON_KAFKA_PROP_SASL_PASSWORD_FILE={missing:?}: cannot read the file"
        )),
        "{err}"
    );
}

#[test]
fn a_ca_file_the_database_url_names_must_be_readable() {
    let ca = SecretFile::new(b"-----BEGIN CERTIFICATE-----\n");
    let url = format!(
        "postgres://app:s3cret@db/recon?sslmode=verify-full&sslrootcert={}",
        ca.path
    );
    Config::from_vars(vars(&[("DATABASE_URL", &url)])).expect("readable CA file");
    for (param, path) in [
        ("sslrootcert", "/nonexistent/ca.crt"),
        ("ssl-root-cert", "/nonexistent/other.crt"),
        ("sslrootcert", "/nonexistent/with%20space.crt"),
    ] {
        let url = format!("postgres://app:s3cret@db/recon?sslmode=verify-full&{param}={path}");
        let err = Config::from_vars(vars(&[("DATABASE_URL", &url)]))
            .expect_err(path)
            .to_string();
        let decoded = path.replace("%20", " ");
        assert!(
            err.starts_with(&format!(
                "DATABASE_URL (sslrootcert)={decoded:?}: cannot read the file: "
            )) && !err.contains("s3cret"),
            "{err}"
        );
    }
}

#[test]
fn migrating_at_run_is_automatic_unless_turned_off() {
    let config = Config::from_vars(vars(&[URL])).expect("valid");
    assert_eq!(config.migrate, MigrateMode::Auto);
    let config = Config::from_vars(vars(&[URL, ("RECON_MIGRATE", "never")])).expect("valid");
    assert_eq!(config.migrate, MigrateMode::Never);
    let err = Config::from_vars(vars(&[URL, ("RECON_MIGRATE", "always")]))
        .expect_err("invalid")
        .to_string();
    assert!(
        err.contains("RECON_MIGRATE") && err.contains("always") && err.contains("expected"),
        "{err}"
    );
}
