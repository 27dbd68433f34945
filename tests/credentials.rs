//! Credentials map, context directories, sequence.json persistence and the lock, checked
//! against aiocoap 0.4.17's documented and observed behaviour, and against a real aiocoap
//! process (tests/interop/aiocoap_context.py run with the interop venv's python).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::Duration;

use oscore_gateway::credentials::{
    load_context_params, ContextStore, Credential, CredentialKind, CredentialsError,
    CredentialsMap, LockError, NextSequenceError, Received, SequenceState, SettingsError,
    StoreError, ValueProblem,
};
use oscore_gateway::oscore::sequence::MAX_SENDER_SEQUENCE_NUMBER;
use oscore_gateway::oscore::{AeadAlgorithm, HkdfAlgorithm, ReplayWindowState};

// ---------------------------------------------------------------------------------------
// helpers

const DOC_SETTINGS: &str = r#"{"sender-id_hex": "01", "recipient-id_ascii": "file", "secret_ascii": "Correct Horse Battery Staple"}"#;

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

fn write(path: &Path, text: &str) {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::write(path, text).unwrap();
}

/// A context directory with aiocoap's documentation settings.
fn doc_context(parent: &Path, name: &str) -> PathBuf {
    let dir = parent.join(name);
    write(&dir.join("settings.json"), DOC_SETTINGS);
    dir
}

fn read_state(dir: &Path) -> SequenceState {
    let path = dir.join("sequence.json");
    SequenceState::parse(&std::fs::read_to_string(&path).unwrap(), &path).unwrap()
}

fn sequence_bytes(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("sequence.json")).unwrap()
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".sequence-"))
        .collect()
}

fn creds(text: &str) -> CredentialsMap {
    CredentialsMap::from_json(text, Path::new("/srv/gw/creds.json")).unwrap()
}

fn matched_key<'a>(map: &'a CredentialsMap, uri: &str) -> Option<&'a str> {
    map.lookup_entry(uri).map(|e| e.key.as_str())
}

// ---------------------------------------------------------------------------------------
// 1. credentials map

/// aiocoap-oscore.md §1.2, verified against aiocoap 0.4.17.
#[test]
fn pattern_precedence_matches_aiocoap() {
    let map = creds(
        r#"{
        "*": {"oscore": {"basedir": "any"}},
        "coap://localhost/*": {"oscore": {"basedir": "lh"}},
        "coap://localhost:5690/*": {"oscore": {"basedir": "lh5690"}},
        "coap://*.example/*": {"oscore": {"basedir": "example"}},
        "coap://exact/path": {"oscore": {"basedir": "exact"}}
    }"#,
    );
    for (uri, want) in [
        ("coap://localhost/a/b", "coap://localhost/*"),
        ("coap://localhost:5690/x", "coap://localhost:5690/*"),
        // An explicitly written default port is not normalised away.
        ("coap://localhost:5683/x", "*"),
        ("coap://a.b.example/q", "coap://*.example/*"),
        ("coap://exact/path", "coap://exact/path"),
        ("coap://exact/path/", "*"),
        ("coap://exact/path?x", "*"),
        ("coap+tcp://localhost/x", "*"),
        ("coap://localhost/", "coap://localhost/*"),
    ] {
        assert_eq!(matched_key(&map, uri), Some(want), "uri {uri}");
    }
    let lh = map
        .lookup("coap://localhost/a")
        .unwrap()
        .as_oscore()
        .unwrap();
    assert_eq!(lh.basedir, Path::new("/srv/gw/lh"));
}

/// interop README: the default port must be left out of patterns.
#[test]
fn explicit_port_in_pattern_matches_only_explicit_port() {
    let map = creds(r#"{"coap://localhost:5683/*": {"oscore": {"basedir": "a"}}}"#);
    assert_eq!(map.lookup("coap://localhost/x"), None);
    assert!(map.lookup("coap://localhost:5683/x").is_some());
    let map = creds(r#"{"coap://localhost/*": {"oscore": {"basedir": "a"}}}"#);
    assert!(map.lookup("coap://localhost/x").is_some());
    assert!(map.lookup("coap://localhost/x?q=1").is_some());
    assert_eq!(map.lookup("coap://localhost:5783/x"), None);
}

#[test]
fn equal_length_patterns_go_by_file_order_and_labels_never_match() {
    let map = creds(
        r#"{"coap://h/*b": {"dtls": {}}, "coap://h/a*": {"oscore": {"basedir": "x"}},
            ":coap://h/ab": {"oscore": {"basedir": "label"}}}"#,
    );
    assert_eq!(matched_key(&map, "coap://h/ab"), Some("coap://h/*b"));
    let map =
        creds(r#"{"coap://h/a*": {"oscore": {"basedir": "x"}}, "coap://h/*b": {"dtls": {}}}"#);
    assert_eq!(matched_key(&map, "coap://h/ab"), Some("coap://h/a*"));
    // A longer wildcard beats an exact pattern that is shorter.
    let map =
        creds(r#"{"coap://h/ab": {"oscore": {"basedir": "x"}}, "coap://h/a**": {"dtls": {}}}"#);
    assert_eq!(matched_key(&map, "coap://h/ab"), Some("coap://h/a**"));
}

#[test]
fn many_patterns_are_matched_through_the_index() {
    let mut text = String::from("{");
    for i in 0..5000 {
        text.push_str(&format!(
            "\"coap://dev{i}.example/*\": {{\"oscore\": {{\"basedir\": \"d{i}\"}}}},\
             \"coap://dev{i}.example/exact\": {{\"oscore\": {{\"basedir\": \"e{i}\"}}}},"
        ));
    }
    text.push_str("\"coap://*\": {\"dtls\": {}}}");
    let map = creds(&text);
    for i in [0, 1, 17, 4999] {
        let a = map.lookup(&format!("coap://dev{i}.example/a")).unwrap();
        assert_eq!(
            a.as_oscore().unwrap().basedir,
            Path::new(&format!("/srv/gw/d{i}"))
        );
        let e = map.lookup(&format!("coap://dev{i}.example/exact")).unwrap();
        assert_eq!(
            e.as_oscore().unwrap().basedir,
            Path::new(&format!("/srv/gw/e{i}"))
        );
    }
    assert_eq!(
        map.lookup("coap://dev5000.example/a"),
        Some(&Credential::Other(CredentialKind::Dtls))
    );
    assert_eq!(map.lookup("coaps://dev1.example/a"), None);
}

/// aiocoap leaves a reference unresolved and then sends in plain text; we resolve it.
#[test]
fn references_are_resolved_for_oscore() {
    let map = creds(
        r#"{"coap://h/*": ":fs", ":fs": {"oscore": {"basedir": "ctx/fs"}},
            "coap://i/*": ":alias", ":alias": ":fs", ":gone": null}"#,
    );
    let e = map.lookup_entry("coap://h/x").unwrap();
    assert_eq!(e.reference.as_deref(), Some(":fs"));
    let (entry, o) = map.oscore_for("coap://i/x").unwrap().unwrap();
    assert_eq!(entry.key, "coap://i/*");
    assert_eq!(o.basedir, Path::new("/srv/gw/ctx/fs"));
    let labels: Vec<&str> = map.server_labels().map(|(l, _)| l).collect();
    assert_eq!(labels, [":fs", ":alias"]);
    // One directory, although three entries lead to it: open and lock it once.
    assert_eq!(map.oscore_dirs(), [Path::new("/srv/gw/ctx/fs")]);
    let keys: Vec<&str> = map.entries().iter().map(|e| e.key.as_str()).collect();
    assert_eq!(keys, ["coap://h/*", ":fs", "coap://i/*", ":alias"]);
}

#[test]
fn relative_basedir_is_relative_to_the_credentials_file() {
    let tmp = tempdir();
    let file = tmp.path().join("conf/creds.json");
    write(
        &file,
        r#"{"coap://a/*": {"oscore": {"basedir": "ctx/a/"}}, ":b": {"oscore": {"contextfile": "/abs/b"}}}"#,
    );
    let cwd_before = std::env::current_dir().unwrap();
    let map = CredentialsMap::load(&file).unwrap();
    assert_eq!(std::env::current_dir().unwrap(), cwd_before);
    let a = map.lookup("coap://a/x").unwrap().as_oscore().unwrap();
    assert_eq!(a.basedir, tmp.path().join("conf/ctx/a/"));
    let (_, b) = map.server_labels().next().unwrap();
    let b = b.as_oscore().unwrap();
    assert_eq!(b.basedir, Path::new("/abs/b"));
    assert!(b.deprecated_contextfile);
}

#[test]
fn null_values_are_ignored_and_other_kinds_are_not_oscore() {
    let map = creds(
        r#"{"coap://gone/*": null, "coaps://h/*": {"dtls": {"psk": {"ascii": "k"}, "client-identity": {"ascii": "c"}}},
            "coap://e/*": {"edhoc-oscore": {"suite": 2, "method": 3}}}"#,
    );
    assert_eq!(map.entries().len(), 2);
    assert_eq!(map.lookup("coap://gone/x"), None);
    assert_eq!(map.oscore_for("coap://gone/x").unwrap(), None);
    let err = map.oscore_for("coaps://h/x").unwrap_err();
    assert!(matches!(
        err,
        CredentialsError::NotOscore {
            kind: CredentialKind::Dtls,
            ..
        }
    ));
    assert_eq!(
        err.to_string(),
        "credentials file /srv/gw/creds.json, entry \"coaps://h/*\": a dtls credential is not usable for OSCORE"
    );
    assert!(map.oscore_for("coap://e/x").is_err());
}

#[test]
fn credential_errors_name_file_line_and_column() {
    let tmp = tempdir();
    let file = tmp.path().join("bad.json");
    write(
        &file,
        "{\n  \"coap://h/*\": {\"oscore\": {\"basedir\": \"x\"}}\n  \"*\": null\n}",
    );
    let err = CredentialsMap::load(&file).unwrap_err();
    let CredentialsError::Syntax(s) = &err else {
        panic!("{err}")
    };
    assert_eq!((s.line, s.column), (3, 3));
    assert_eq!(s.path, file);
    assert!(
        format!("{}", s).starts_with(&format!("{}:3:3: ", file.display())),
        "{s}"
    );

    write(
        &file,
        r#"{"*": {"oscore": {"basedir": "a", "contextfile": "b"}}}"#,
    );
    let err = CredentialsMap::load(&file).unwrap_err().to_string();
    assert!(
        err.contains(&file.display().to_string())
            && err.contains("\"*\"")
            && err.contains("contextfile"),
        "{err}"
    );

    let err = CredentialsMap::load(tmp.path().join("missing.json")).unwrap_err();
    assert!(matches!(err, CredentialsError::Read { .. }), "{err}");
}

// ---------------------------------------------------------------------------------------
// 2. context directory: settings.json + secret.json

#[test]
fn suffixes_split_files_and_all_keys() {
    let tmp = tempdir();
    let d = tmp.path();
    // The plugtest layout: secret and salt in secret.json, the rest in settings.json.
    write(
        &d.join("secret.json"),
        r#"{"secret_hex": "0102030405060708090a0b0c0d0e0f10", "salt_hex": "9E7CA92223786340"}"#,
    );
    write(
        &d.join("settings.json"),
        r#"{"algorithm": "A128GCM", "kdf-hashfun": "sha512", "sender-id_hex": "", "recipient-id_ascii": "srv",
            "id-context_hex": "37cbf3210017a2d3", "window": 64, "comment": "unknown keys are ignored"}"#,
    );
    let p = load_context_params(d).unwrap();
    assert_eq!(
        p.master_secret,
        hex::decode("0102030405060708090a0b0c0d0e0f10").unwrap()
    );
    assert_eq!(p.master_salt, hex::decode("9e7ca92223786340").unwrap());
    assert_eq!(p.sender_id, b"");
    assert_eq!(p.recipient_id, b"srv");
    assert_eq!(
        p.id_context.as_deref(),
        Some(&hex::decode("37cbf3210017a2d3").unwrap()[..])
    );
    assert_eq!(p.aead, AeadAlgorithm::A128Gcm);
    assert_eq!(p.hkdf, HkdfAlgorithm::Sha512);
    assert_eq!(p.replay_window, 64);
}

#[test]
fn defaults_of_the_documentation_example() {
    let tmp = tempdir();
    let d = doc_context(tmp.path(), "c");
    let p = load_context_params(&d).unwrap();
    assert_eq!(p.sender_id, [1]);
    assert_eq!(p.recipient_id, b"file");
    assert_eq!(p.master_secret, b"Correct Horse Battery Staple");
    assert_eq!(p.master_salt, b"");
    assert_eq!(p.id_context, None);
    assert_eq!(p.aead, AeadAlgorithm::AesCcm16_64_128);
    assert_eq!(p.hkdf, HkdfAlgorithm::Sha256);
    assert_eq!(p.replay_window, 32);
    // secret.json alone is enough too.
    std::fs::rename(d.join("settings.json"), d.join("secret.json")).unwrap();
    assert_eq!(load_context_params(&d).unwrap().recipient_id, b"file");
}

#[test]
fn a_datum_present_twice_names_both_places() {
    let tmp = tempdir();
    let d = doc_context(tmp.path(), "c");
    write(&d.join("secret.json"), r#"{"secret_hex": "00"}"#);
    let err = load_context_params(&d).unwrap_err();
    assert!(matches!(err, SettingsError::DuplicateDatum { .. }), "{err}");
    assert_eq!(
        err.to_string(),
        format!(
            "context directory {}: datum \"secret\" is present twice: as \"secret_hex\" in secret.json and as \"secret_ascii\" in settings.json",
            d.display()
        )
    );
    std::fs::remove_file(d.join("secret.json")).unwrap();
    write(
        &d.join("settings.json"),
        r#"{"sender-id_hex": "01", "sender-id_ascii": "x", "recipient-id_hex": "", "secret_hex": "00"}"#,
    );
    let err = load_context_params(&d).unwrap_err().to_string();
    assert!(
        err.contains(
            "\"sender-id_hex\" in settings.json and as \"sender-id_ascii\" in settings.json"
        ),
        "{err}"
    );
}

#[test]
fn unknown_algorithm_lists_the_valid_names() {
    let tmp = tempdir();
    let d = tmp.path();
    write(
        &d.join("settings.json"),
        r#"{"sender-id_hex": "01", "recipient-id_hex": "02", "secret_hex": "00", "algorithm": "AES-CCM-16-64-129"}"#,
    );
    let err = load_context_params(d).unwrap_err();
    let SettingsError::BadValue {
        path,
        key,
        problem: ValueProblem::UnknownAlgorithm { name, .. },
    } = &err
    else {
        panic!("{err}")
    };
    assert_eq!(
        (path.as_path(), key.as_str(), name.as_str()),
        (
            d.join("settings.json").as_path(),
            "algorithm",
            "AES-CCM-16-64-129"
        )
    );
    assert_eq!(
        err.to_string(),
        format!(
            "{}, key \"algorithm\": unknown AEAD algorithm \"AES-CCM-16-64-129\"; valid names: \
             AES-CCM-16-64-128, AES-CCM-16-64-256, AES-CCM-64-64-128, AES-CCM-64-64-256, AES-CCM-16-128-128, \
             AES-CCM-16-128-256, AES-CCM-64-128-128, AES-CCM-64-128-256, A128GCM, A192GCM, A256GCM, ChaCha20/Poly1305",
            d.join("settings.json").display()
        )
    );
    write(
        &d.join("settings.json"),
        r#"{"sender-id_hex": "01", "recipient-id_hex": "02", "secret_hex": "00", "kdf-hashfun": "md5"}"#,
    );
    let err = load_context_params(d).unwrap_err().to_string();
    assert!(
        err.ends_with("unknown HKDF hash function \"md5\"; valid names: sha256, sha384, sha512"),
        "{err}"
    );
}

#[test]
fn settings_errors_say_which_file_and_key() {
    let tmp = tempdir();
    let d = tmp.path();
    let settings = d.join("settings.json");
    type IsExpected = fn(&ValueProblem) -> bool;
    let cases: [(&str, &str, IsExpected); 9] = [
        (r#"{"window": "32"}"#, "window", |p| {
            matches!(p, ValueProblem::BadWindow { .. })
        }),
        (r#"{"window": 32.5}"#, "window", |p| {
            matches!(p, ValueProblem::BadWindow { .. })
        }),
        (r#"{"window": 0}"#, "window", |p| {
            matches!(p, ValueProblem::BadWindow { .. })
        }),
        (r#"{"window": 129}"#, "window", |p| {
            matches!(p, ValueProblem::BadWindow { .. })
        }),
        (r#"{"salt_hex": "01:02"}"#, "salt_hex", |p| {
            matches!(p, ValueProblem::BadHex(_))
        }),
        (r#"{"salt_hex": "012"}"#, "salt_hex", |p| {
            matches!(p, ValueProblem::BadHex(_))
        }),
        (r#"{"salt_ascii": "grüß"}"#, "salt_ascii", |p| {
            *p == ValueProblem::NotAscii
        }),
        (r#"{"salt": "01"}"#, "salt", |p| {
            *p == ValueProblem::BytesWithoutSuffix
        }),
        (
            r#"{"algorithm_ascii": "A128GCM"}"#,
            "algorithm_ascii",
            |p| *p == ValueProblem::NameNotString,
        ),
    ];
    for (extra, want_key, check) in cases {
        let mut obj: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(DOC_SETTINGS).unwrap();
        obj.extend(serde_json::from_str::<serde_json::Map<_, _>>(extra).unwrap());
        write(&settings, &serde_json::to_string(&obj).unwrap());
        match load_context_params(d) {
            Err(SettingsError::BadValue { path, key, problem }) => {
                assert_eq!(path, settings, "{extra}");
                assert_eq!(key, want_key, "{extra}");
                assert!(check(&problem), "{extra}: {problem}");
            }
            other => panic!("{extra}: {other:?}"),
        }
    }
}

#[test]
fn missing_keys_files_and_long_ids() {
    let tmp = tempdir();
    let d = tmp.path();
    let err = load_context_params(d).unwrap_err();
    assert!(
        matches!(err, SettingsError::NoSettingsFiles { .. }),
        "{err}"
    );
    write(
        &d.join("settings.json"),
        r#"{"recipient-id_hex": "01", "secret_hex": "00"}"#,
    );
    let err = load_context_params(d).unwrap_err();
    assert!(
        matches!(
            err,
            SettingsError::Missing {
                datum: "sender-id",
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("configuration key missing: sender-id"),
        "{err}"
    );
    // 7-byte IDs are the limit for 13-byte nonces, 1 byte for AES-CCM-64-*.
    write(
        &d.join("settings.json"),
        r#"{"sender-id_hex": "01020304050607", "recipient-id_hex": "", "secret_hex": "00"}"#,
    );
    assert_eq!(load_context_params(d).unwrap().sender_id.len(), 7);
    write(
        &d.join("settings.json"),
        r#"{"sender-id_hex": "01", "recipient-id_hex": "0102", "secret_hex": "00", "algorithm": "AES-CCM-64-64-128"}"#,
    );
    let err = load_context_params(d).unwrap_err();
    match &err {
        SettingsError::BadValue {
            key,
            problem: ValueProblem::IdTooLong { len: 2, max: 1, .. },
            ..
        } => {
            assert_eq!(key, "recipient-id_hex")
        }
        other => panic!("{other}"),
    }
    write(&d.join("settings.json"), "{\"sender-id_hex\": \"01\",}");
    let err = load_context_params(d).unwrap_err();
    let SettingsError::Syntax(s) = &err else {
        panic!("{err}")
    };
    assert_eq!(s.path, d.join("settings.json"));
    assert_eq!(s.line, 1);
}

// ---------------------------------------------------------------------------------------
// 3. sequence.json through the store

#[test]
fn open_and_close_round_trips_aiocoap_samples_byte_exact() {
    let tmp = tempdir();
    let store = ContextStore::new();
    for (i, sample) in [
        r#"{"next-to-send": 107, "received": {"index": 0, "bitfield": 0}}"#,
        r#"{"next-to-send": 0, "received": {"index": 0, "bitfield": 2047}}"#,
        r#"{"next-to-send": 2, "received": {"index": 11, "bitfield": 1}}"#,
        r#"{"next-to-send": 104, "received": "unknown"}"#,
    ]
    .into_iter()
    .enumerate()
    {
        let d = doc_context(tmp.path(), &format!("c{i}"));
        write(&d.join("sequence.json"), sample);
        let ctx = store.open(&d).unwrap();
        let stored = SequenceState::parse(sample, Path::new("sample")).unwrap();
        let window = ctx.replay_window.lock().unwrap().state();
        match stored.received {
            Received::Unknown => assert_eq!(window, None),
            Received::Window(w) => assert_eq!(window, Some(w)),
        }
        assert_eq!(ctx.sequence().next(), stored.next_to_send);
        // While open, the file holds the mark and "unknown".
        assert_eq!(
            sequence_bytes(&d),
            format!(
                "{{\"next-to-send\": {}, \"received\": \"unknown\"}}",
                stored.next_to_send + 10
            )
        );
        ctx.persister.close().unwrap();
        assert_eq!(sequence_bytes(&d), sample, "sample {i}");
        assert!(!d.join("lock").exists());
        assert!(leftovers(&d).is_empty());
    }
}

#[test]
fn null_window_reads_as_unknown() {
    let tmp = tempdir();
    let d = doc_context(tmp.path(), "c");
    write(
        &d.join("sequence.json"),
        r#"{"next-to-send": 10, "received": {"index": null, "bitfield": null}}"#,
    );
    let ctx = ContextStore::new().open(&d).unwrap();
    assert!(!ctx.replay_window.lock().unwrap().is_initialized());
    assert_eq!(ctx.sequence().next(), 10);
    ctx.persister.close().unwrap();
    assert_eq!(
        sequence_bytes(&d),
        r#"{"next-to-send": 10, "received": "unknown"}"#
    );
}

#[test]
fn missing_sequence_file_is_fresh_and_the_file_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempdir();
    let d = doc_context(tmp.path(), "c");
    let ctx = ContextStore::new().open(&d).unwrap();
    assert_eq!(ctx.sequence().next(), 0);
    assert_eq!(
        ctx.replay_window.lock().unwrap().state(),
        Some(ReplayWindowState {
            index: 0,
            bitfield: 0
        })
    );
    assert_eq!(
        sequence_bytes(&d),
        r#"{"next-to-send": 10, "received": "unknown"}"#
    );
    let mode = std::fs::metadata(d.join("sequence.json"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    drop(ctx); // Drop closes as a fallback.
    assert_eq!(
        sequence_bytes(&d),
        r#"{"next-to-send": 0, "received": {"index": 0, "bitfield": 0}}"#
    );
    assert!(!d.join("lock").exists());
}

#[test]
fn marks_grow_like_aiocoap_and_always_cover_every_number_handed_out() {
    let tmp = tempdir();
    let d = doc_context(tmp.path(), "c");
    let ctx = ContextStore::new().open(&d).unwrap();
    let mut marks = vec![read_state(&d).next_to_send];
    for expected in 0..20_000u64 {
        let n = ctx.persister.next_sequence_number().unwrap();
        assert_eq!(n.0, expected);
        let on_disk = read_state(&d).next_to_send;
        assert!(
            on_disk > n.0,
            "number {} handed out with {} on disk",
            n.0,
            on_disk
        );
        if *marks.last().unwrap() != on_disk {
            marks.push(on_disk);
        }
    }
    // aiocoap: 10, 30, 70, 150, ... (chunk doubles up to 10000).
    assert_eq!(&marks[..6], [10, 30, 70, 150, 310, 630]);
    assert_eq!(ctx.persister.chunk(), 10_000);
    assert!(marks.windows(2).all(|w| w[1] - w[0] <= 10_000));
    ctx.persister.close().unwrap();
    assert_eq!(read_state(&d).next_to_send, 20_000);
}

/// Many busy contexts: the persister raises their marks in batches (one group of durable
/// writes); every number any thread gets is below the mark on disk at that moment, the
/// numbers of each context are unique and gap-free, and every file holds its final mark.
#[test]
fn many_busy_contexts_are_raised_in_batches_and_never_outrun_the_disk() {
    const CONTEXTS: usize = 64;
    const USES: u64 = 200;
    let tmp = tempdir();
    let store = ContextStore::new();
    let dirs: Vec<PathBuf> = (0..CONTEXTS)
        .map(|i| doc_context(tmp.path(), &format!("c{i}")))
        .collect();
    let opened: Vec<_> = dirs.iter().map(|d| store.open(d).unwrap()).collect();
    let got: Vec<Mutex<Vec<u64>>> = (0..CONTEXTS).map(|_| Mutex::new(Vec::new())).collect();
    std::thread::scope(|s| {
        for t in 0..4 {
            let (opened, dirs, got) = (&opened, &dirs, &got);
            s.spawn(move || {
                for round in 0..USES / 4 {
                    for k in 0..CONTEXTS {
                        // Each thread walks the contexts from another starting point.
                        let i = (k + t * CONTEXTS / 4 + round as usize) % CONTEXTS;
                        let n = opened[i].persister.next_sequence_number().unwrap().0;
                        let on_disk = read_state(&dirs[i]).next_to_send;
                        assert!(
                            on_disk > n,
                            "c{i}: number {n} handed out with {on_disk} on disk"
                        );
                        got[i].lock().unwrap().push(n);
                    }
                }
            });
        }
    });
    for (i, (ctx, d)) in opened.iter().zip(&dirs).enumerate() {
        let mut mine = std::mem::take(&mut *got[i].lock().unwrap());
        mine.sort_unstable();
        assert_eq!(mine, (0..USES).collect::<Vec<_>>(), "c{i}");
        let mark = read_state(d).next_to_send;
        assert!(
            mark >= USES && mark == ctx.persister.persisted_limit(),
            "c{i}: {mark}"
        );
        ctx.persister.close().unwrap();
        assert_eq!(read_state(d).next_to_send, USES);
        assert!(leftovers(d).is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_reservations_from_many_tasks_are_unique_and_persisted() {
    let tmp = tempdir();
    let d = doc_context(tmp.path(), "c");
    let ctx = ContextStore::new().open(&d).unwrap();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let p = ctx.persister.clone();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            for _ in 0..2_000 {
                got.push(p.next_sequence_number_async().await.unwrap().0);
            }
            got
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort_unstable();
    assert_eq!(all, (0..16_000).collect::<Vec<u64>>());
    ctx.persister.close().unwrap();
    assert_eq!(read_state(&d).next_to_send, 16_000);
}

#[test]
fn threads_reserving_concurrently_with_close_never_lose_a_number() {
    let tmp = tempdir();
    let d = doc_context(tmp.path(), "c");
    let ctx = ContextStore::new().open(&d).unwrap();
    let used = Arc::new(Mutex::new(Vec::new()));
    let mut threads = Vec::new();
    for _ in 0..3 {
        let p = ctx.persister.clone();
        let used = Arc::clone(&used);
        threads.push(std::thread::spawn(move || loop {
            match p.next_sequence_number() {
                Ok(n) => used.lock().unwrap().push(n.0),
                Err(NextSequenceError::Closed { .. }) => return,
                Err(e) => panic!("{e}"),
            }
        }));
    }
    std::thread::sleep(Duration::from_millis(300));
    ctx.persister.close().unwrap();
    for t in threads {
        t.join().unwrap();
    }
    let used = used.lock().unwrap();
    let max = *used.iter().max().unwrap();
    assert!(used.len() > 10, "only {} numbers", used.len());
    assert!(read_state(&d).next_to_send > max);
    // Nothing can be taken after close, not even through the shared SenderSequence.
    assert!(ctx.sequence().reserve().is_err());
    assert!(matches!(
        ctx.persister.try_next_sequence_number(),
        Err(NextSequenceError::Closed { .. })
    ));
}

#[test]
fn close_writes_the_real_window_and_disarms_it() {
    let tmp = tempdir();
    let d = doc_context(tmp.path(), "c");
    let ctx = ContextStore::new().open(&d).unwrap();
    for _ in 0..3 {
        ctx.persister.next_sequence_number().unwrap();
    }
    {
        let mut w = ctx.replay_window.lock().unwrap();
        for n in [0, 1, 5, 40] {
            assert!(w.strike_out(n));
        }
    }
    ctx.persister.close().unwrap();
    ctx.persister.close().unwrap(); // idempotent
    assert_eq!(
        sequence_bytes(&d),
        r#"{"next-to-send": 3, "received": {"index": 9, "bitfield": 2147483648}}"#
    );
    // A replay can no longer be accepted by this process after the window was saved.
    assert!(!ctx.replay_window.lock().unwrap().is_valid(41));
}

#[test]
fn exhaustion_at_2_pow_40_minus_1() {
    let tmp = tempdir();
    let d = doc_context(tmp.path(), "c");
    write(
        &d.join("sequence.json"),
        &format!(
            "{{\"next-to-send\": {}, \"received\": \"unknown\"}}",
            MAX_SENDER_SEQUENCE_NUMBER - 1
        ),
    );
    let ctx = ContextStore::new().open(&d).unwrap();
    assert_eq!(read_state(&d).next_to_send, MAX_SENDER_SEQUENCE_NUMBER + 1);
    assert_eq!(
        ctx.persister.next_sequence_number().unwrap().0,
        MAX_SENDER_SEQUENCE_NUMBER - 1
    );
    assert_eq!(
        ctx.persister.next_sequence_number().unwrap().0,
        MAX_SENDER_SEQUENCE_NUMBER
    );
    let err = ctx.persister.next_sequence_number().unwrap_err();
    assert!(matches!(err, NextSequenceError::Exhausted { .. }), "{err}");
    ctx.persister.close().unwrap();
    assert_eq!(read_state(&d).next_to_send, MAX_SENDER_SEQUENCE_NUMBER + 1);
}

#[test]
fn a_failed_write_is_reported_and_retried() {
    let tmp = tempdir();
    let d = doc_context(tmp.path(), "c");
    let ctx = ContextStore::new().open(&d).unwrap();
    // A non-empty directory where sequence.json should be: rename(2) fails even for root.
    std::fs::remove_file(d.join("sequence.json")).unwrap();
    write(&d.join("sequence.json/blocker"), "");
    let mut handed_out = Vec::new();
    let err = loop {
        match ctx.persister.next_sequence_number() {
            Ok(n) => handed_out.push(n.0),
            Err(e) => break e,
        }
    };
    assert_eq!(
        handed_out,
        (0..10).collect::<Vec<_>>(),
        "only numbers below the first mark"
    );
    let NextSequenceError::PersistFailed { message, .. } = &err else {
        panic!("{err}")
    };
    assert!(
        message.contains("sequence.json") && message.contains("renaming"),
        "{message}"
    );
    // A retry the persister queued meanwhile may still be writing its temp file: every
    // attempt must clean up after itself, so wait (bounded) until none is left.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !leftovers(&d).is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(leftovers(&d).is_empty(), "{:?}", leftovers(&d));
    std::fs::remove_dir_all(d.join("sequence.json")).unwrap();
    assert_eq!(ctx.persister.next_sequence_number().unwrap().0, 10);
    assert!(read_state(&d).next_to_send > 10);
    ctx.persister.close().unwrap();
}

// ---------------------------------------------------------------------------------------
// 4. the lock

#[test]
fn a_second_open_in_the_same_process_is_refused() {
    let tmp = tempdir();
    let d = doc_context(tmp.path(), "c");
    let store = ContextStore::new();
    let first = store.open(&d).unwrap();
    let before = sequence_bytes(&d);
    let err = store.open(&d).unwrap_err();
    assert!(
        matches!(err, StoreError::Lock(LockError::InUse { .. })),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        format!(
            "context directory {} is in use by another process (flock on {}/lock is held)",
            d.display(),
            d.display()
        )
    );
    // The refused open neither wrote nor removed anything.
    assert_eq!(sequence_bytes(&d), before);
    assert!(d.join("lock").exists());
    // Another store (another persister thread) is refused just the same.
    assert!(ContextStore::new().open(&d).is_err());
    first.persister.close().unwrap();
    store.open(&d).unwrap().persister.close().unwrap();
}

#[test]
fn a_failed_open_releases_the_lock() {
    let tmp = tempdir();
    let d = tmp.path().join("c");
    write(&d.join("settings.json"), r#"{"sender-id_hex": "01"}"#);
    assert!(matches!(
        ContextStore::new().open(&d),
        Err(StoreError::Settings(_))
    ));
    assert!(!d.join("lock").exists());
    assert!(!d.join("sequence.json").exists());
    let err = ContextStore::new()
        .open(tmp.path().join("nope"))
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Lock(LockError::NoDirectory { .. })),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------
// 5. metrics

#[derive(Default)]
struct TestRecorder {
    counters: Mutex<HashMap<String, Arc<AtomicU64>>>,
    histograms: Mutex<HashMap<String, Arc<Mutex<Vec<f64>>>>>,
}

struct TestCounter(Arc<AtomicU64>);
impl metrics::CounterFn for TestCounter {
    fn increment(&self, v: u64) {
        self.0.fetch_add(v, Ordering::Relaxed);
    }
    fn absolute(&self, v: u64) {
        self.0.fetch_max(v, Ordering::Relaxed);
    }
}
struct TestHistogram(Arc<Mutex<Vec<f64>>>);
impl metrics::HistogramFn for TestHistogram {
    fn record(&self, v: f64) {
        self.0.lock().unwrap().push(v);
    }
}

fn key_name(key: &metrics::Key) -> String {
    let labels: Vec<String> = key
        .labels()
        .map(|l| format!("{}={}", l.key(), l.value()))
        .collect();
    format!("{}{{{}}}", key.name(), labels.join(","))
}

impl metrics::Recorder for TestRecorder {
    fn describe_counter(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_gauge(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_histogram(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn register_counter(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        let c = self
            .counters
            .lock()
            .unwrap()
            .entry(key_name(key))
            .or_default()
            .clone();
        metrics::Counter::from_arc(Arc::new(TestCounter(c)))
    }
    fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::noop()
    }
    fn register_histogram(
        &self,
        key: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        let h = self
            .histograms
            .lock()
            .unwrap()
            .entry(key_name(key))
            .or_default()
            .clone();
        metrics::Histogram::from_arc(Arc::new(TestHistogram(h)))
    }
}

fn recorder() -> &'static TestRecorder {
    static R: OnceLock<&'static TestRecorder> = OnceLock::new();
    R.get_or_init(|| {
        let r: &'static TestRecorder = Box::leak(Box::default());
        metrics::set_global_recorder(r).unwrap();
        r
    })
}

impl TestRecorder {
    fn counter(&self, name: &str) -> u64 {
        self.counters
            .lock()
            .unwrap()
            .get(name)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }
    fn samples(&self, name: &str) -> usize {
        self.histograms
            .lock()
            .unwrap()
            .get(name)
            .map_or(0, |h| h.lock().unwrap().len())
    }
}

#[test]
fn writes_are_counted_and_timed() {
    let r = recorder();
    let (open, raise, close) = (
        "oscore_sequence_persist_total{reason=open}",
        "oscore_sequence_persist_total{reason=raise}",
        "oscore_sequence_persist_total{reason=close}",
    );
    let before = (
        r.counter(open),
        r.counter(raise),
        r.counter(close),
        r.samples("oscore_sequence_persist_seconds{reason=raise}"),
    );
    let tmp = tempdir();
    let d = doc_context(tmp.path(), "c");
    let ctx = ContextStore::new().open(&d).unwrap();
    for _ in 0..100 {
        ctx.persister.next_sequence_number().unwrap();
    }
    ctx.persister.close().unwrap();
    // Other tests in this binary write too, so the counts can only be lower bounds.
    assert!(r.counter(open) > before.0);
    assert!(
        r.counter(raise) >= before.1 + 3,
        "marks 30, 70, 150 at least"
    );
    assert!(r.counter(close) > before.2);
    assert!(r.samples("oscore_sequence_persist_seconds{reason=raise}") >= before.3 + 3);
}

// ---------------------------------------------------------------------------------------
// 6. against a real aiocoap 0.4.17 process

fn aiocoap_python() -> PathBuf {
    let python = std::env::var_os("AIOCOAP_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("target/interop/venv/bin/python")
        });
    assert!(
        python.exists(),
        "{} not found: create the aiocoap 0.4.17 venv with ../shared/interop/setup.sh (or set AIOCOAP_PYTHON)",
        python.display()
    );
    python
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/aiocoap_context.py")
}

/// Runs the script to completion (bounded) and returns its stdout.
fn aiocoap(args: &[&str]) -> String {
    let mut child = Command::new(aiocoap_python())
        .arg(script())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut guard = KillOnDrop(Some(child.id()));
    let (tx, rx) = mpsc::channel();
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        let (mut o, mut e) = (String::new(), String::new());
        out.read_to_string(&mut o).unwrap();
        err.read_to_string(&mut e).unwrap();
        tx.send((o, e)).unwrap();
    });
    let (stdout, stderr) = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("aiocoap script timed out");
    let status = child.wait().unwrap();
    guard.0 = None;
    assert!(status.success(), "aiocoap {args:?} failed: {stderr}");
    stdout
}

/// Kills a child we started (by its PID) if a test fails before it ended.
struct KillOnDrop(Option<u32>);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
    }
}

fn read_line_within(lines: &mpsc::Receiver<String>, secs: u64) -> String {
    lines
        .recv_timeout(Duration::from_secs(secs))
        .expect("no line from child in time")
}

fn line_reader(out: ChildStdout) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// An aiocoap process holding a context (mode `hold`).
struct AiocoapHolder {
    child: Child,
    lines: mpsc::Receiver<String>,
    _guard: KillOnDrop,
}

impl AiocoapHolder {
    fn start(dir: &Path) -> Self {
        let mut child = Command::new(aiocoap_python())
            .arg(script())
            .args(["hold", dir.to_str().unwrap()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let guard = KillOnDrop(Some(child.id()));
        let lines = line_reader(child.stdout.take().unwrap());
        assert_eq!(read_line_within(&lines, 60), "LOCKED");
        Self {
            child,
            lines,
            _guard: guard,
        }
    }

    /// Closes its stdin: aiocoap then shuts the context down cleanly.
    fn stop(mut self) {
        drop(self.child.stdin.take());
        assert_eq!(read_line_within(&self.lines, 60), "RELEASED");
        assert!(self.child.wait().unwrap().success());
        self._guard.0 = None;
    }
}

#[test]
fn aiocoap_and_we_exclude_each_other() {
    let tmp = tempdir();
    let d = doc_context(tmp.path(), "c");
    let holder = AiocoapHolder::start(&d);
    let err = ContextStore::new().open(&d).unwrap_err();
    assert!(
        matches!(err, StoreError::Lock(LockError::InUse { .. })),
        "{err}"
    );
    holder.stop();
    assert!(
        !d.join("lock").exists(),
        "aiocoap deletes lock at clean shutdown"
    );

    let ctx = ContextStore::new().open(&d).unwrap();
    let out = aiocoap(&["try", d.to_str().unwrap()]);
    assert!(out.starts_with("FAIL Timeout"), "{out}");
    ctx.persister.close().unwrap();
    assert_eq!(aiocoap(&["try", d.to_str().unwrap()]).trim(), "OK");
}

#[test]
fn aiocoap_continues_where_we_closed_byte_exact() {
    let tmp = tempdir();
    let d = doc_context(tmp.path(), "c");
    let ctx = ContextStore::new().open(&d).unwrap();
    for _ in 0..37 {
        ctx.persister.next_sequence_number().unwrap();
    }
    {
        let mut w = ctx.replay_window.lock().unwrap();
        for n in [0, 1, 5, 40, 33] {
            assert!(w.strike_out(n));
        }
    }
    ctx.persister.close().unwrap();
    let ours = sequence_bytes(&d);
    let state: serde_json::Value =
        serde_json::from_str(&aiocoap(&["state", d.to_str().unwrap()])).unwrap();
    assert_eq!(state["next"], 37);
    assert_eq!(state["window"]["index"], 9);
    assert_eq!(state["window"]["bitfield"], (1u64 << 31) | (1 << 24));
    // aiocoap rewrote the file at its shutdown from the same state: identical bytes.
    assert_eq!(sequence_bytes(&d), ours);
}

#[test]
fn we_continue_where_aiocoap_stopped() {
    let tmp = tempdir();
    let d = doc_context(tmp.path(), "c");
    let out: serde_json::Value = serde_json::from_str(&aiocoap(&[
        "use",
        d.to_str().unwrap(),
        "12",
        "0",
        "1",
        "5",
        "40",
    ]))
    .unwrap();
    assert_eq!(out["used"].as_array().unwrap().len(), 12);
    let theirs = sequence_bytes(&d);
    assert_eq!(
        theirs,
        r#"{"next-to-send": 12, "received": {"index": 9, "bitfield": 2147483648}}"#
    );
    let ctx = ContextStore::new().open(&d).unwrap();
    assert_eq!(ctx.sequence().next(), 12);
    assert_eq!(
        ctx.replay_window.lock().unwrap().state(),
        Some(ReplayWindowState {
            index: 9,
            bitfield: 1 << 31
        })
    );
    assert!(!ctx.replay_window.lock().unwrap().is_valid(40));
    assert_eq!(ctx.params.recipient_id, b"file");
    ctx.persister.close().unwrap();
    assert_eq!(
        sequence_bytes(&d),
        theirs,
        "close without use writes back the same bytes"
    );
}

#[test]
fn aiocoap_null_window_after_our_unknown() {
    let tmp = tempdir();
    let d = doc_context(tmp.path(), "c");
    write(
        &d.join("sequence.json"),
        r#"{"next-to-send": 50, "received": "unknown"}"#,
    );
    ContextStore::new()
        .open(&d)
        .unwrap()
        .persister
        .close()
        .unwrap();
    assert_eq!(
        sequence_bytes(&d),
        r#"{"next-to-send": 50, "received": "unknown"}"#
    );
    let state: serde_json::Value =
        serde_json::from_str(&aiocoap(&["state", d.to_str().unwrap()])).unwrap();
    assert_eq!(state["next"], 50);
    assert!(state["window"].is_null());
    // aiocoap saves a never-initialised window as nulls; that must read as unknown.
    assert_eq!(
        sequence_bytes(&d),
        r#"{"next-to-send": 50, "received": {"index": null, "bitfield": null}}"#
    );
    let ctx = ContextStore::new().open(&d).unwrap();
    assert!(!ctx.replay_window.lock().unwrap().is_initialized());
    ctx.persister.close().unwrap();
}

// ---------------------------------------------------------------------------------------
// 7. crash: SIGKILL while reserving

const CRASH_CHILD_ENV: &str = "OSCORE_CREDS_CRASH_CHILD_DIR";

/// Parent and child in one test: the parent re-runs this test binary with
/// `OSCORE_CREDS_CRASH_CHILD_DIR` set; the child reserves numbers forever and prints each
/// one after it got it; the parent SIGKILLs it at different points. The mark on disk must
/// be above every number the child printed, and no number may ever be handed out twice
/// across the restarts.
#[test]
fn sigkill_while_reserving_never_reuses_a_number() {
    if let Some(dir) = std::env::var_os(CRASH_CHILD_ENV) {
        crash_child(Path::new(&dir));
    }
    let tmp = tempdir();
    let d = doc_context(tmp.path(), "c");
    let mut highest_used: Option<u64> = None;
    for kill_after in [3u64, 700, 25_000] {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "sigkill_while_reserving_never_reuses_a_number",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CRASH_CHILD_ENV, &d)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let guard = KillOnDrop(Some(child.id()));
        let lines = line_reader(child.stdout.take().unwrap());
        let mut used = Vec::new();
        while (used.len() as u64) < kill_after {
            let line = read_line_within(&lines, 60);
            if let Some(n) = line.strip_prefix("USED ") {
                used.push(n.parse::<u64>().unwrap());
            }
        }
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGKILL) };
        child.wait().unwrap();
        drop(guard);
        // Lines written before the kill are still in the pipe.
        while let Ok(line) = lines.recv_timeout(Duration::from_secs(5)) {
            if let Some(n) = line.strip_prefix("USED ") {
                used.push(n.parse::<u64>().unwrap());
            }
        }
        let first = used[0];
        if let Some(h) = highest_used {
            assert!(first > h, "restart reused {first} (had used up to {h})");
        }
        assert!(used.windows(2).all(|w| w[1] == w[0] + 1));
        let max = *used.last().unwrap();
        let state = read_state(&d);
        assert!(
            state.next_to_send > max,
            "on disk {} but {} was used",
            state.next_to_send,
            max
        );
        assert_eq!(
            state.received,
            Received::Unknown,
            "a crash must lead to B.1.2 recovery"
        );
        assert!(
            d.join("lock").exists(),
            "the lock file outlives a kill, harmlessly"
        );
        highest_used = Some(max);
    }
    // The stale lock does not block, and we resume at the mark.
    let ctx = ContextStore::new().open(&d).unwrap();
    assert!(ctx.persister.next_sequence_number().unwrap().0 > highest_used.unwrap());
    ctx.persister.close().unwrap();
}

fn crash_child(dir: &Path) -> ! {
    let ctx = ContextStore::new().open(dir).unwrap();
    let mut out = std::io::stdout().lock();
    for i in 0u64.. {
        let n = ctx.persister.next_sequence_number().unwrap();
        writeln!(out, "USED {}", n.0).unwrap();
        out.flush().unwrap();
        if i % 512 == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    unreachable!()
}
