//! `cairn image import` end to end: from the local registries that
//! tools/dev/registry-server.sh starts (filled here by `skopeo copy` from
//! the fixture layouts), with and without basic auth, credentials from a
//! Docker config (plain `auths` and a credential helper), an image index
//! resolved to a platform, a reference by digest; from a docker archive;
//! and a failed import that leaves no name behind.

mod common;
mod oci_common;

use std::process::Command;
use std::sync::OnceLock;

use oci_common::{fixtures, stderr, Env};
use serde_json::Value;

struct Registries {
    open: String,
    auth: String,
    user: String,
    password: String,
}

fn registries() -> Registries {
    let get = |k: &str| {
        std::env::var(k).unwrap_or_else(|_| {
            panic!("{k} is not set: eval \"$(tools/dev/registry-server.sh start)\" (tools/dev/test.sh does)")
        })
    };
    Registries {
        open: get("CAIRN_TEST_REGISTRY"),
        auth: get("CAIRN_TEST_REGISTRY_AUTH"),
        user: get("CAIRN_TEST_REGISTRY_USER"),
        password: get("CAIRN_TEST_REGISTRY_PASSWORD"),
    }
}

/// Pushes fixture layout `name` to both registries as `fixture/NAME:latest`
/// (an index with all its platforms). Once per test binary.
fn pushed(name: &str) -> String {
    static DONE: OnceLock<std::sync::Mutex<Vec<String>>> = OnceLock::new();
    let done = DONE.get_or_init(Default::default);
    let mut done = done.lock().unwrap();
    let r = registries();
    if !done.iter().any(|d| d == name) {
        let src = format!("oci:{}:latest", fixtures().join(name).display());
        for (host, creds) in [
            (&r.open, None),
            (&r.auth, Some(format!("{}:{}", r.user, r.password))),
        ] {
            let mut c = Command::new("skopeo");
            c.args(["copy", "-q", "--all", "--dest-tls-verify=false"]);
            if let Some(creds) = creds {
                c.args(["--dest-creds", &creds]);
            }
            common::run_ok(
                c.arg(&src)
                    .arg(format!("docker://{host}/fixture/{name}:latest")),
            );
        }
        done.push(name.to_owned());
    }
    name.to_owned()
}

#[test]
fn pulls_from_a_registry_and_reimports_nothing() {
    let r = registries();
    let name = pushed("multi");
    let e = Env::new();
    let reference = format!("docker://{}/fixture/{name}:latest", r.open);
    let v = e.ok_json(&["image", "import", "--insecure", &reference]);
    assert_eq!(
        v["name"], "multi",
        "the name defaults to the repository's last element"
    );
    assert!(v["new_bytes"].as_u64().unwrap() > 0);
    assert_eq!(v["layers"].as_array().unwrap().len(), 3);
    let digest = v["digest"].as_str().unwrap().to_owned();
    for k in ["id", "logical_bytes", "stored_bytes"] {
        assert!(!v[k].is_null(), "{k} missing from {v}");
    }
    // Again, and by digest: nothing new.
    let again = e.ok_json(&[
        "image",
        "import",
        "--insecure",
        &reference,
        "--name",
        "again",
    ]);
    assert_eq!(again["new_bytes"], 0);
    let by_digest = format!("docker://{}/fixture/{name}@{digest}", r.open);
    // The same disk, but the source recorded is the digest: another
    // manifest, so the name moves only when told to.
    let out = e.cairn(&["image", "import", "--insecure", &by_digest]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("is taken"), "{}", stderr(&out));
    let d = e.ok_json(&["image", "import", "--insecure", &by_digest, "--replace"]);
    assert_eq!(d["new_bytes"], 0);
    assert_eq!(d["digest"], digest.as_str());

    let desc = e.ok_json(&["image", "describe", "multi"]);
    let img = &desc["image"];
    assert_eq!(img["config"]["WorkingDir"], "/srv");
    assert_eq!(img["config"]["Env"][1], "GREETING=hello");
    assert_eq!(img["source"]["manifest_digest"], digest.as_str());
    assert_eq!(img["source"]["layers"].as_array().unwrap().len(), 3);
    let text = e.cairn(&["image", "describe", "multi"]);
    assert!(String::from_utf8_lossy(&text.stdout).contains("workdir         /srv"));
}

#[test]
fn https_is_the_default_and_plain_http_needs_insecure() {
    let r = registries();
    let name = pushed("multi");
    let e = Env::new();
    let out = e.cairn(&[
        "image",
        "import",
        &format!("docker://{}/fixture/{name}:latest", r.open),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("--insecure"), "{}", stderr(&out));
    assert!(e.names().is_empty());
}

#[test]
fn basic_auth_from_the_docker_config_and_a_401_that_names_it() {
    let r = registries();
    let name = pushed("multi");
    let e = Env::new();
    let reference = format!("docker://{}/fixture/{name}:latest", r.auth);
    let out = e.cairn(&["image", "import", "--insecure", &reference]);
    assert_eq!(out.status.code(), Some(1));
    let msg = stderr(&out);
    let config = e.docker_config().join("config.json");
    assert!(
        msg.contains("401") && msg.contains(&config.display().to_string()),
        "{msg}"
    );
    assert!(e.names().is_empty(), "a failed import left a name");

    // `auths`: base64 of user:password.
    let auth = base64(&format!("{}:{}", r.user, r.password));
    std::fs::write(
        &config,
        format!(r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#, r.auth),
    )
    .unwrap();
    let v = e.ok_json(&[
        "image",
        "import",
        "--insecure",
        &reference,
        "--name",
        "with-auths",
    ]);
    assert_eq!(v["name"], "with-auths");

    // A credential helper (docker-credential-NAME on PATH, JSON on stdout).
    let helper = e.docker_config().join("docker-credential-cairntest");
    std::fs::write(
        &helper,
        format!(
            "#!/bin/sh\nread server\necho '{{\"ServerURL\":\"'$server'\",\"Username\":\"{}\",\"Secret\":\"{}\"}}'\n",
            r.user, r.password
        ),
    )
    .unwrap();
    common::run_ok(Command::new("chmod").arg("+x").arg(&helper));
    std::fs::write(
        &config,
        format!(r#"{{"credHelpers":{{"{}":"cairntest"}}}}"#, r.auth),
    )
    .unwrap();
    let v = e.ok_json(&[
        "image",
        "import",
        "--insecure",
        &reference,
        "--name",
        "with-helper",
    ]);
    assert_eq!(v["new_bytes"], 0);

    // Wrong password: a 401 again.
    let bad = base64(&format!("{}:wrong", r.user));
    std::fs::write(
        &config,
        format!(r#"{{"auths":{{"{}":{{"auth":"{bad}"}}}}}}"#, r.auth),
    )
    .unwrap();
    let out = e.cairn(&["image", "import", "--insecure", &reference, "--name", "bad"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(!e.names().contains(&"bad".to_owned()));
}

#[test]
fn an_image_index_is_resolved_to_the_platform() {
    let r = registries();
    let name = pushed("multiarch");
    let e = Env::new();
    let reference = format!("docker://{}/fixture/{name}:latest", r.open);
    let amd = e.ok_json(&[
        "image",
        "import",
        "--insecure",
        &reference,
        "--platform",
        "linux/amd64",
        "--name",
        "amd",
    ]);
    let arm = e.ok_json(&[
        "image",
        "import",
        "--insecure",
        &reference,
        "--platform",
        "linux/arm64",
        "--name",
        "arm",
    ]);
    assert_eq!(amd["layers"].as_array().unwrap().len(), 1);
    assert_eq!(arm["layers"].as_array().unwrap().len(), 2);
    assert_eq!(
        e.ok_json(&["image", "describe", "arm"])["image"]["config"]["Labels"]["arch"],
        "arm64"
    );
    let out = e.cairn(&[
        "image",
        "import",
        "--insecure",
        &reference,
        "--platform",
        "linux/s390x",
    ]);
    assert!(
        stderr(&out).contains("linux/amd64, linux/arm64"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn docker_archive_and_layout_imports_and_a_damaged_one_leaves_no_name() {
    let e = Env::new();
    let archive = format!(
        "docker-archive:{}",
        fixtures().join("multi.docker.tar").display()
    );
    let v = e.ok_json(&["image", "import", &archive]);
    assert_eq!(v["name"], "multi");

    // A copy of the layout with one byte of a layer blob changed.
    let bad = e.dir.path().join("bad");
    common::run_ok(
        Command::new("cp")
            .arg("-r")
            .arg(fixtures().join("multi"))
            .arg(&bad),
    );
    let index: Value =
        serde_json::from_slice(&std::fs::read(bad.join("index.json")).unwrap()).unwrap();
    let md = index["manifests"][0]["digest"].as_str().unwrap();
    let m: Value =
        serde_json::from_slice(&std::fs::read(bad.join("blobs/sha256").join(&md[7..])).unwrap())
            .unwrap();
    let layer = bad
        .join("blobs/sha256")
        .join(&m["layers"][2]["digest"].as_str().unwrap()[7..]);
    let mut bytes = std::fs::read(&layer).unwrap();
    bytes[600] ^= 0xff;
    std::fs::write(&layer, bytes).unwrap();
    let out = e.cairn(&[
        "image",
        "import",
        &format!("oci:{}:latest", bad.display()),
        "--name",
        "damaged",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("hash to"), "{}", stderr(&out));
    assert_eq!(e.names(), vec!["multi".to_owned()]);
}

fn base64(s: &str) -> String {
    let out = common::run_ok(
        Command::new("sh")
            .arg("-c")
            .arg(format!("printf %s '{s}' | base64 -w0")),
    );
    String::from_utf8(out.stdout).unwrap()
}
