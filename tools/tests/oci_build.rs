//! `cairn image build`: a multi-stage Dockerfile over the `boot` fixture
//! (busybox), RUN in bubblewrap, COPY from the context and from a stage,
//! ENV/ARG substitution; the step cache (a rebuild runs nothing, a changed
//! last RUN reruns only itself); RUN as a non-root USER (by name and by
//! number: ids, HOME, owners, access); refusals (COPY ../x, FROM $VAR). Needs
//! bubblewrap (tools/dev/setup.sh installs it) and root (the build root's
//! owners and devices).

mod common;
mod oci_common;

use std::path::{Path, PathBuf};
use std::process::Command;

use oci_common::{fixtures, stderr, Env};

trait BuildEnv {
    fn context(&self, name: &str, dockerfile: &str, files: &[(&str, &str)]) -> PathBuf;
    fn debugfs(&self, image: &str, request: &str) -> String;
    fn cat(&self, image: &str, path: &str) -> String;
    fn owner(&self, image: &str, path: &str) -> (u32, u32);
}

impl BuildEnv for Env {
    /// A build context `name` with this Dockerfile and files.
    fn context(&self, name: &str, dockerfile: &str, files: &[(&str, &str)]) -> PathBuf {
        let d = self.dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("Dockerfile"), dockerfile).unwrap();
        for (f, body) in files {
            std::fs::write(d.join(f), body).unwrap();
        }
        d
    }

    /// What debugfs answers to `request` on the image's exported disk.
    fn debugfs(&self, image: &str, request: &str) -> String {
        let img = self.dir.path().join(format!("{image}.img"));
        let out = self.cairn(&["image", "export", image, img.to_str().unwrap()]);
        assert!(out.status.success());
        let out = common::run_ok(Command::new("debugfs").arg("-R").arg(request).arg(&img));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A file of the image's disk, read by debugfs.
    fn cat(&self, image: &str, path: &str) -> String {
        self.debugfs(image, &format!("cat {path}"))
    }

    /// The uid and gid of a file of the image's disk, read by debugfs.
    fn owner(&self, image: &str, path: &str) -> (u32, u32) {
        let text = self.debugfs(image, &format!("stat {path}"));
        let field = |name: &str| -> u32 {
            let rest = &text[text.find(name).unwrap_or_else(|| panic!("{text}")) + name.len()..];
            rest.split_whitespace().next().unwrap().parse().unwrap()
        };
        (field("User:"), field("Group:"))
    }
}

fn dockerfile(base: &Path, last_run: &str) -> String {
    format!(
        r#"# a multi-stage build
FROM oci:{base}:latest AS builder
RUN echo built > /artifact
FROM oci:{base}:latest
ARG GREETING=hi
ENV APP_HOME=/app GREETING=$GREETING
WORKDIR $APP_HOME
COPY hello.txt ./
COPY --from=builder /artifact /app/artifact
ONBUILD RUN echo never
RUN {last_run}
CMD ["/bin/sh", "-c", "cat /app/greeting"]
"#,
        base = base.display()
    )
}

#[test]
fn builds_caches_each_step_and_reruns_only_what_changed() {
    let e = Env::new();
    let base = fixtures().join("boot");
    let run = r#"cat /app/hello.txt > /app/copied && rm /etc/greeting && echo "$GREETING" > /app/greeting"#;
    let ctx = e.context(
        "app",
        &dockerfile(&base, run),
        &[
            ("hello.txt", "from the context\n"),
            ("secret.log", "no\n"),
            (".dockerignore", "*.log\n"),
        ],
    );
    let ctx_s = ctx.to_str().unwrap();
    let v = e.ok_json(&["image", "build", ctx_s, "--build-arg", "GREETING=bonjour"]);
    assert_eq!(
        v["name"], "app",
        "the name defaults to the context folder's"
    );
    assert_eq!(v["steps_run"], 4, "{v}");
    assert!(v["notes"][0].as_str().unwrap().contains("ONBUILD"));
    assert_eq!(e.cat("app", "/app/greeting"), "bonjour\n");
    assert_eq!(e.cat("app", "/app/copied"), "from the context\n");
    assert_eq!(e.cat("app", "/app/artifact"), "built\n");
    let d = e.ok_json(&["image", "describe", "app"]);
    assert_eq!(d["image"]["config"]["WorkingDir"], "/app");
    assert!(d["image"]["dockerfile"]
        .as_str()
        .unwrap()
        .contains("FROM oci:"));

    // Nothing changed: no step runs, the image comes from the cache.
    let again = e.ok_json(&["image", "build", ctx_s, "--build-arg", "GREETING=bonjour"]);
    assert_eq!(again["steps_run"], 0);
    assert_eq!(again["cached"], true);
    assert_eq!(again["id"], v["id"]);

    // Only the last RUN changed: only it runs.
    std::fs::write(
        ctx.join("Dockerfile"),
        dockerfile(&base, &format!("{run} && echo more >> /app/greeting")),
    )
    .unwrap();
    let rebuild = [
        "image",
        "build",
        ctx_s,
        "--build-arg",
        "GREETING=bonjour",
        "--replace",
    ];
    let changed = e.ok_json(&rebuild);
    assert_eq!(changed["steps_run"], 1, "{changed}");
    assert_eq!(e.cat("app", "/app/greeting"), "bonjour\nmore\n");

    // A changed file in the context reruns its COPY and the steps after it
    // (COPY --from and RUN), not the first stage.
    std::fs::write(ctx.join("hello.txt"), "changed\n").unwrap();
    let copied = e.ok_json(&rebuild);
    assert_eq!(copied["steps_run"], 3, "{copied}");
    assert_eq!(e.cat("app", "/app/copied"), "changed\n");

    // Without --replace, a build that makes another image keeps the name
    // where it was.
    std::fs::write(ctx.join("hello.txt"), "changed again\n").unwrap();
    let out = e.cairn(&["image", "build", ctx_s, "--build-arg", "GREETING=bonjour"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("the image name `app` is taken"),
        "a rebuild moved a name without --replace: {}",
        stderr(&out)
    );
    assert_eq!(e.cat("app", "/app/copied"), "changed\n");
}

#[test]
fn refuses_context_escapes_and_variables_in_from() {
    let e = Env::new();
    let base = fixtures().join("boot");
    let ctx = e.context(
        "esc",
        &format!("FROM oci:{}:latest\nCOPY ../outside /x\n", base.display()),
        &[],
    );
    std::fs::write(e.dir.path().join("outside"), "secret").unwrap();
    let out = e.cairn(&["image", "build", ctx.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(
        msg.contains("../outside") && msg.contains("leaves the build context"),
        "{msg}"
    );

    let ctx = e.context("var", "ARG BASE=x\nFROM $BASE\n", &[]);
    let out = e.cairn(&["image", "build", ctx.to_str().unwrap()]);
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(msg.contains("variables in FROM"), "{msg}");
    let names = e.ok_json(&["image", "ls"]);
    assert_eq!(
        names.as_array().unwrap().len(),
        0,
        "a failed build left a name"
    );
}

/// A busybox root with a user `app` (1234, group 1234, also in `staff`),
/// its home, a root-only /root and a world-writable /tmp; then `rest`.
fn user_dockerfile(base: &Path, rest: &str) -> String {
    format!(
        r#"FROM oci:{base}:latest
RUN for a in id touch mkdir chown chmod; do busybox ln -s busybox /bin/$a; done
RUN printf 'root:x:0:0:root:/root:/bin/sh\napp:x:1234:1234::/home/app:/bin/sh\n' > /etc/passwd && printf 'root:x:0:\napp:x:1234:\nstaff:x:50:app\n' > /etc/group
RUN mkdir -p /home/app /root && chown 1234:1234 /home/app && chmod 700 /root && chmod 1777 /tmp
{rest}"#,
        base = base.display()
    )
}

#[test]
fn run_honours_user_by_name_and_by_number() {
    let e = Env::new();
    let base = fixtures().join("boot");
    let ctx = e.context(
        "users",
        &user_dockerfile(
            &base,
            r#"USER app
RUN id -u > /tmp/uid && id -G > /tmp/groups && echo "$HOME" > /tmp/home && touch /home/app/f
USER 4321
RUN id -u > /tmp/n-uid && id -g > /tmp/n-gid && echo "$HOME" > /tmp/n-home && mkdir /tmp/n
USER 4321:77
RUN touch /tmp/ng
USER app:staff
RUN ["touch", "/home/app/g"]
"#,
        ),
        &[],
    );
    let v = e.ok_json(&["image", "build", ctx.to_str().unwrap()]);
    assert_eq!(v["steps_run"], 7, "{v}");
    // By name: passwd's uid, primary group and home, group's groups.
    assert_eq!(e.cat("users", "/tmp/uid"), "1234\n");
    assert_eq!(e.cat("users", "/tmp/groups"), "1234 50\n");
    assert_eq!(e.cat("users", "/tmp/home"), "/home/app\n");
    assert_eq!(e.owner("users", "/home/app/f"), (1234, 1234));
    assert_eq!(e.owner("users", "/home/app/g"), (1234, 50));
    // By a number passwd does not know: gid 0 and HOME / (as Docker).
    assert_eq!(e.cat("users", "/tmp/n-uid"), "4321\n");
    assert_eq!(e.cat("users", "/tmp/n-gid"), "0\n");
    assert_eq!(e.cat("users", "/tmp/n-home"), "/\n");
    assert_eq!(e.owner("users", "/tmp/n"), (4321, 0));
    assert_eq!(e.owner("users", "/tmp/ng"), (4321, 77));
    let d = e.ok_json(&["image", "describe", "users"]);
    assert_eq!(d["image"]["config"]["User"], "app:staff");
}

#[test]
fn run_as_user_cannot_write_where_the_user_may_not() {
    let e = Env::new();
    let base = fixtures().join("boot");
    let ctx = e.context(
        "denied",
        &user_dockerfile(&base, "USER app\nRUN touch /root/secret\n"),
        &[],
    );
    let out = e.cairn(&["image", "build", ctx.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let msg = stderr(&out);
    assert!(msg.contains("Permission denied"), "{msg}");
    assert!(
        msg.contains(
            "Dockerfile line 6: RUN /bin/sh -c touch /root/secret (as uid 1234, gid 1234) failed"
        ),
        "{msg}"
    );

    // A name passwd does not have is an error naming the line.
    let ctx = e.context(
        "unknown",
        &user_dockerfile(&base, "USER nobody\nRUN id\n"),
        &[],
    );
    let out = e.cairn(&["image", "build", ctx.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let msg = stderr(&out);
    assert!(
        msg.contains("Dockerfile line 6: RUN as USER nobody: no user named `nobody`"),
        "{msg}"
    );
    assert!(e.names().is_empty(), "a failed build left a name");
}
