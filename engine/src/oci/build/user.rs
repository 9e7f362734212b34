//! Who a RUN step runs as: the stage's USER resolved against the build
//! root's `/etc/passwd` and `/etc/group`, as Docker (runc) does.
//!
//! `USER name`, `USER uid`, `USER name:group`, `USER uid:gid` (and mixes).
//! A name must be in the files; a number need not be. The group is, in
//! order: the one given, else the user's primary group from passwd, else 0
//! (Docker's default for a uid with no passwd entry). Supplementary groups
//! are the groups of `/etc/group` that list the user by name, and only when
//! no group is given (as runc does). HOME is the user's home from passwd,
//! else `/`.

use super::sandbox::Identity;

/// A resolved USER.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub id: Identity,
    pub home: String,
}

/// Ids Docker accepts: 0 to 2^31 - 1.
fn number(s: &str) -> Option<Result<u32, String>> {
    let n: u64 = s.parse().ok()?;
    Some(if n <= i32::MAX as u64 {
        Ok(n as u32)
    } else {
        Err(format!("{s} is out of range (at most {})", i32::MAX))
    })
}

struct PasswdEntry<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
}

struct GroupEntry<'a> {
    name: &'a str,
    gid: u32,
    members: Vec<&'a str>,
}

/// The colon-separated fields of each line of `text` that is not a
/// comment and has at least `min` fields.
fn colon_records(text: &str, min: usize) -> impl Iterator<Item = Vec<&str>> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(move |f| f.len() >= min)
}

fn passwd_entries(text: &str) -> impl Iterator<Item = PasswdEntry<'_>> {
    colon_records(text, 7).filter_map(|f| {
        Some(PasswdEntry {
            name: f[0],
            uid: f[2].parse().ok()?,
            gid: f[3].parse().ok()?,
            home: f[5],
        })
    })
}

fn group_entries(text: &str) -> impl Iterator<Item = GroupEntry<'_>> {
    colon_records(text, 4).filter_map(|f| {
        Some(GroupEntry {
            name: f[0],
            gid: f[2].parse().ok()?,
            members: f[3]
                .split(',')
                .map(str::trim)
                .filter(|m| !m.is_empty())
                .collect(),
        })
    })
}

/// Resolves `spec` (a USER value; empty means root) against the contents
/// of the build root's passwd and group files (empty when missing). The
/// error says what was not found.
pub fn resolve(spec: &str, passwd: &str, group: &str) -> Result<User, String> {
    let spec = spec.trim();
    let (user_arg, group_arg) = match spec.split_once(':') {
        Some((u, g)) => (u, g),
        None => (spec, ""),
    };
    let user_num = number(user_arg).transpose()?;
    let entry = passwd_entries(passwd).find(|e| match (user_arg, user_num) {
        ("", _) => e.uid == 0,
        (_, Some(n)) => e.uid == n,
        (name, None) => e.name == name,
    });
    let (uid, mut gid, home, name) = match (&entry, user_num) {
        (Some(e), _) => (e.uid, e.gid, e.home.to_owned(), Some(e.name)),
        (None, Some(n)) => (n, 0, "/".to_owned(), None),
        (None, None) if user_arg.is_empty() => (0, 0, "/".to_owned(), None),
        (None, None) => {
            return Err(format!(
                "no user named `{user_arg}` in the image's /etc/passwd"
            ))
        }
    };
    let mut groups = Vec::new();
    if group_arg.is_empty() {
        if let Some(name) = name {
            groups = group_entries(group)
                .filter(|g| g.members.contains(&name))
                .map(|g| g.gid)
                .collect();
        }
    } else {
        let group_num = number(group_arg).transpose()?;
        let found = group_entries(group).find(|g| match group_num {
            Some(n) => g.gid == n,
            None => g.name == group_arg,
        });
        gid = match (found, group_num) {
            (Some(g), _) => g.gid,
            (None, Some(n)) => n,
            (None, None) => {
                return Err(format!(
                    "no group named `{group_arg}` in the image's /etc/group"
                ))
            }
        };
    }
    groups.sort_unstable();
    groups.dedup();
    Ok(User {
        id: Identity { uid, gid, groups },
        home: if home.is_empty() { "/".into() } else { home },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
        # a comment\n\
        app:x:1234:1200::/home/app:/bin/sh\n\
        nohome:x:1300:1300::::\n";
    const GROUP: &str = "root:x:0:\nstaff:x:50:app,other\napps:x:1200:\nwheel:x:10: app \n";

    fn id(uid: u32, gid: u32, groups: &[u32]) -> Identity {
        Identity {
            uid,
            gid,
            groups: groups.to_vec(),
        }
    }

    #[test]
    fn names_and_numbers_resolve_as_docker_does() {
        let r = |s| resolve(s, PASSWD, GROUP);
        assert_eq!(
            r("app").unwrap(),
            User {
                id: id(1234, 1200, &[10, 50]),
                home: "/home/app".into()
            }
        );
        // A uid in passwd is that user, with its groups.
        assert_eq!(r("1234").unwrap().id, id(1234, 1200, &[10, 50]));
        // An explicit group replaces the primary one and drops the
        // supplementary ones.
        assert_eq!(r("app:staff").unwrap().id, id(1234, 50, &[]));
        assert_eq!(r("app:777").unwrap().id, id(1234, 777, &[]));
        assert_eq!(r("1234:apps").unwrap().id, id(1234, 1200, &[]));
        // A uid not in passwd: gid 0, HOME /.
        assert_eq!(
            r("4321").unwrap(),
            User {
                id: id(4321, 0, &[]),
                home: "/".into()
            }
        );
        assert_eq!(r("4321:4321").unwrap().id, id(4321, 4321, &[]));
        assert_eq!(r("").unwrap().home, "/root");
        assert_eq!(r("root").unwrap().id, id(0, 0, &[]));
        assert_eq!(r("nohome").unwrap().home, "/");
        // No passwd at all (a scratch image): root, or numbers only.
        assert_eq!(resolve("", "", "").unwrap().id, id(0, 0, &[]));
        assert_eq!(resolve("5:6", "", "").unwrap().id, id(5, 6, &[]));
    }

    #[test]
    fn unknown_names_and_bad_numbers_are_errors() {
        let e = resolve("nobody", PASSWD, GROUP).unwrap_err();
        assert!(e.contains("no user named `nobody`"), "{e}");
        let e = resolve("app:nogroup", PASSWD, GROUP).unwrap_err();
        assert!(e.contains("no group named `nogroup`"), "{e}");
        let e = resolve("4294967295", PASSWD, GROUP).unwrap_err();
        assert!(e.contains("out of range"), "{e}");
    }
}
