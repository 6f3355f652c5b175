//! The bus's accounts and permissions: who may publish and subscribe to what.
//!
//! The services share one NATS account (`PAGEMESH`), each role (gateway, tokenizer, scheduler,
//! executor, detokenizer) with its own NKey user whose permissions allow only its own subjects.
//! Each external client gets an account of its own that imports the public subjects as
//! services: a client can publish only to those subjects and receives only the answers to its
//! own requests; the internal subjects and every other client's traffic are invisible to it.
//! Connections without credentials are refused.
//!
//! [`AuthLayout::render`] writes the nats-server configuration; [`write_auth_dir`] makes the
//! keys (one seed file per role and client, mode 0600) and the configuration in one folder.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use pagemesh_shared::subjects::Subjects;

/// Subjects a requester's answers come back on: the default inboxes of services in the
/// services' account (the gateway's), and the reply subjects NATS maps imported requests to.
const PUBLIC_REPLY_SUBJECTS: [&str; 2] = ["_INBOX.>", "_R_.>"];

/// How long an imported request's reply subject stays mapped: the longest a stream may run.
pub const RESPONSE_THRESHOLD: &str = "1h";

/// A service role on the bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// HTTP gateway.
    Gateway,
    /// Tokenizer.
    Tokenizer,
    /// Scheduler.
    Scheduler,
    /// Executor.
    Executor,
    /// Detokenizer.
    Detokenizer,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 5] = [Role::Gateway, Role::Tokenizer, Role::Scheduler, Role::Executor, Role::Detokenizer];

    /// The role's name (also its seed file's stem).
    pub fn name(self) -> &'static str {
        match self {
            Role::Gateway => "gateway",
            Role::Tokenizer => "tokenizer",
            Role::Scheduler => "scheduler",
            Role::Executor => "executor",
            Role::Detokenizer => "detokenizer",
        }
    }

    /// The inbox prefix of the role's own requests. The scheduler's step replies come on a
    /// private prefix that only executors may answer on; the gateway's inboxes receive
    /// chunks from detokenizers.
    pub fn inbox_prefix(self) -> &'static str {
        match self {
            Role::Scheduler => "_INBOX_scheduler",
            Role::Tokenizer => "_INBOX_tokenizer",
            _ => "_INBOX",
        }
    }

    /// What the role may publish and subscribe to.
    pub fn permissions(self, s: &Subjects) -> Permissions {
        let p = s.prefix();
        let replies = PUBLIC_REPLY_SUBJECTS.map(String::from);
        let (publish, subscribe, allow_responses): (Vec<String>, Vec<String>, bool) = match self {
            Role::Gateway => (
                client_subjects(s)
                    .into_iter()
                    .chain([s.stats().subject().to_string(), s.scheduler_abort().subject().to_string()])
                    .collect(),
                vec!["_INBOX.>".into()],
                false,
            ),
            Role::Tokenizer => {
                let mut publish = vec![s.submit().subject().to_string()];
                publish.extend(replies);
                let own_inbox = format!("{}.>", Role::Tokenizer.inbox_prefix());
                (
                    publish,
                    vec![
                        s.generate().subject().to_string(),
                        s.tokenize().subject().to_string(),
                        s.detokenize().subject().to_string(),
                        s.models().subject().to_string(),
                        own_inbox,
                    ],
                    true,
                )
            }
            Role::Scheduler => {
                let mut publish = vec![
                    format!("{p}.v1.executor.*.step"),
                    format!("{p}.v1.detokenizer.*.events"),
                    format!("{p}.v1.detokenizer.*.report"),
                    s.scheduler_heartbeat().subject().to_string(),
                ];
                publish.extend(replies);
                let subscribe = vec![
                    s.submit().subject().to_string(),
                    s.scheduler_abort().subject().to_string(),
                    s.abort().subject().to_string(),
                    s.executor_heartbeat().subject().to_string(),
                    s.detokenizer_heartbeat().subject().to_string(),
                    s.detokenizer_ack().subject().to_string(),
                    s.stats().subject().to_string(),
                    s.health().subject().to_string(),
                    s.scheduler_heartbeat().subject().to_string(),
                    format!("{}.>", Role::Scheduler.inbox_prefix()),
                ];
                (publish, subscribe, true)
            }
            Role::Executor => {
                (vec![s.executor_heartbeat().subject().to_string()], vec![format!("{p}.v1.executor.*.step")], true)
            }
            Role::Detokenizer => {
                let mut publish = vec![
                    s.detokenizer_heartbeat().subject().to_string(),
                    s.detokenizer_ack().subject().to_string(),
                    s.scheduler_abort().subject().to_string(),
                ];
                publish.extend(replies);
                let subscribe = vec![
                    format!("{p}.v1.detokenizer.*.events"),
                    format!("{p}.v1.detokenizer.*.report"),
                    s.scheduler_heartbeat().subject().to_string(),
                ];
                (publish, subscribe, true)
            }
        };
        Permissions { publish, subscribe, allow_responses }
    }
}

/// What one user may publish and subscribe to (everything else is denied).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permissions {
    /// Subjects it may publish to.
    pub publish: Vec<String>,
    /// Subjects it may subscribe to.
    pub subscribe: Vec<String>,
    /// Whether it may answer the requests it receives (once each, on their reply subject).
    pub allow_responses: bool,
}

/// The public subjects a client may use: each exported by the services' account.
pub fn client_subjects(s: &Subjects) -> Vec<String> {
    vec![
        s.generate().subject().to_string(),
        s.abort().subject().to_string(),
        s.tokenize().subject().to_string(),
        s.detokenize().subject().to_string(),
        s.models().subject().to_string(),
        s.health().subject().to_string(),
    ]
}

/// Public keys of every user of a deployment's bus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthLayout {
    /// Where nats-server listens (`host:port`).
    pub listen: String,
    /// Subject prefix.
    pub subjects: Subjects,
    /// Per role, its user's public NKey.
    pub roles: Vec<(Role, String)>,
    /// Per client, its name and its user's public NKey.
    pub clients: Vec<(String, String)>,
    /// Largest message, in bytes.
    pub max_payload: usize,
}

/// Most bytes in one message on a pagemesh bus (NATS's own default).
pub const MAX_PAYLOAD: usize = 1 << 20;

fn quoted_list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|i| format!("\"{i}\"")).collect();
    format!("[{}]", quoted.join(", "))
}

impl AuthLayout {
    /// The nats-server configuration.
    pub fn render(&self) -> String {
        let s = &self.subjects;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# pagemesh bus: written by `pagemesh nats-config`; the seeds beside it are the credentials."
        );
        let _ = writeln!(out, "listen: \"{}\"", self.listen);
        let _ = writeln!(out, "max_payload: {}", self.max_payload);
        let _ = writeln!(out, "max_connections: 65536");
        let _ = writeln!(out, "ping_interval: \"10s\"");
        let _ = writeln!(out, "write_deadline: \"10s\"");
        let _ = writeln!(out, "accounts {{");
        let _ = writeln!(out, "  PAGEMESH {{");
        let _ = writeln!(out, "    users = [");
        for (role, key) in &self.roles {
            let perms = role.permissions(s);
            let responses = if perms.allow_responses { ", allow_responses: true" } else { "" };
            let _ = writeln!(
                out,
                "      # {role}\n      {{ nkey: \"{key}\", permissions: {{ publish: {{ allow: {} }}, subscribe: {{ allow: {} }}{responses} }} }}",
                quoted_list(&perms.publish),
                quoted_list(&perms.subscribe),
                role = role.name(),
            );
        }
        let _ = writeln!(out, "    ]");
        let _ = writeln!(out, "    exports = [");
        for subject in client_subjects(s) {
            let stream = if subject == s.generate().subject() {
                format!(", response_type: stream, response_threshold: \"{RESPONSE_THRESHOLD}\"")
            } else {
                String::new()
            };
            let _ = writeln!(out, "      {{ service: \"{subject}\"{stream} }}");
        }
        let _ = writeln!(out, "    ]");
        let _ = writeln!(out, "  }}");
        for (name, key) in &self.clients {
            let _ = writeln!(out, "  {} {{", client_account(name));
            let publish = quoted_list(&client_subjects(s));
            let _ = writeln!(
                out,
                "    users = [ {{ nkey: \"{key}\", permissions: {{ publish: {{ allow: {publish} }}, subscribe: {{ allow: [\"_INBOX.>\"] }} }} }} ]"
            );
            let imports: Vec<String> = client_subjects(s)
                .iter()
                // `share`: NATS tells the services which account sent each request.
                .map(|subject| format!("{{ service: {{ account: PAGEMESH, subject: \"{subject}\" }}, share: true }}"))
                .collect();
            let _ = writeln!(out, "    imports = [ {} ]", imports.join(", "));
            let _ = writeln!(out, "  }}");
        }
        let _ = writeln!(out, "}}");
        out
    }
}

/// The account name of client `name`.
fn client_account(name: &str) -> String {
    format!("CLIENT_{}", name.to_ascii_uppercase().replace('-', "_"))
}

/// Checks a client name: 1 to 32 ASCII letters, digits, `-` or `_`.
pub fn check_client_name(name: &str) -> Result<(), String> {
    let ok = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    if name.is_empty() || name.len() > 32 || !name.chars().all(ok) {
        return Err(format!("client names are 1 to 32 characters of [A-Za-z0-9_-], got {name:?}"));
    }
    Ok(())
}

/// The seed file of a role or client in an auth folder.
pub fn seed_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.nk"))
}

/// The nats-server configuration file in an auth folder.
pub fn config_path(dir: &Path) -> PathBuf {
    dir.join("nats.conf")
}

/// Reads the seed in `path` (an NKey user seed, `SU…`) and returns it with its public key.
pub fn read_seed(path: &Path) -> Result<(String, String), String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("cannot read the NKey seed {}: {e}", path.display()))?;
    let seed = text.lines().map(str::trim).find(|l| l.starts_with("SU")).unwrap_or_default().to_string();
    let pair =
        nkeys::KeyPair::from_seed(&seed).map_err(|e| format!("{} holds no NKey user seed: {e}", path.display()))?;
    Ok((seed, pair.public_key()))
}

fn write_private(path: &Path, text: &str) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    file.write_all(text.as_bytes()).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// The seed of `name` in `dir`: read when its file exists, else made and written.
fn seed_of(dir: &Path, name: &str) -> Result<String, String> {
    let path = seed_path(dir, name);
    if path.exists() {
        return Ok(read_seed(&path)?.1);
    }
    let pair = nkeys::KeyPair::new_user();
    let seed = pair.seed().map_err(|e| format!("cannot encode an NKey seed: {e}"))?;
    write_private(&path, &format!("{seed}\n"))?;
    Ok(pair.public_key())
}

/// Makes (or completes) an auth folder: a seed per role and per client (existing seeds are
/// kept, so credentials survive a rewrite) and `nats.conf` for a server listening on `listen`.
pub fn write_auth_dir(dir: &Path, listen: &str, prefix: &str, clients: &[String]) -> Result<AuthLayout, String> {
    for name in clients {
        check_client_name(name)?;
        if Role::ALL.iter().any(|r| r.name() == name) {
            return Err(format!("`{name}` names a service role; choose another client name"));
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    }
    let mut roles = Vec::new();
    for role in Role::ALL {
        roles.push((role, seed_of(dir, role.name())?));
    }
    let mut client_keys = Vec::new();
    for name in clients {
        client_keys.push((name.clone(), seed_of(dir, name)?));
    }
    let layout = AuthLayout {
        listen: listen.to_string(),
        subjects: Subjects::new(prefix),
        roles,
        clients: client_keys,
        max_payload: MAX_PAYLOAD,
    };
    write_private(&config_path(dir), &layout.render())?;
    Ok(layout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_role_is_confined_to_its_own_subjects() {
        let s = Subjects::new("pagemesh");
        let executor = Role::Executor.permissions(&s);
        assert_eq!(executor.publish, vec!["pagemesh.v1.executor.heartbeat".to_string()]);
        assert!(executor.allow_responses, "executors answer the steps sent to them");
        let gateway = Role::Gateway.permissions(&s);
        assert!(!gateway.publish.iter().any(|p| p.contains(".v1.executor") || p.contains("submit")));
        for role in Role::ALL {
            let perms = role.permissions(&s);
            for subject in perms.publish.iter().chain(&perms.subscribe) {
                assert_ne!(subject, ">", "{role:?} may not see everything");
                assert!(
                    subject.starts_with("pagemesh.") || subject.starts_with("_INBOX") || subject.starts_with("_R_.")
                );
            }
            let answers_scheduler_inbox = perms.publish.iter().any(|p| p.starts_with("_INBOX_scheduler"));
            assert!(!answers_scheduler_inbox, "only executors answer steps, through allow_responses");
        }
    }

    #[test]
    fn the_config_names_every_user_and_exports_only_public_subjects() {
        let layout = AuthLayout {
            listen: "127.0.0.1:4222".into(),
            subjects: Subjects::new("pm"),
            roles: Role::ALL.iter().map(|r| (*r, format!("U{}", r.name().to_uppercase()))).collect(),
            clients: vec![("alice".into(), "UALICE".into())],
            max_payload: MAX_PAYLOAD,
        };
        let text = layout.render();
        for role in Role::ALL {
            assert!(text.contains(&format!("nkey: \"U{}\"", role.name().to_uppercase())));
        }
        assert!(text.contains("CLIENT_ALICE"));
        assert!(text.contains("{ service: \"pm.generate\", response_type: stream"));
        assert!(!text.contains("service: \"pm.v1."), "internal subjects are never exported");
        assert!(!text.contains("service: \"pm.stats\""), "stats name executors: not for clients");
        assert!(!text.contains("no_auth_user"), "anonymous connections are refused");
    }

    #[test]
    fn an_auth_dir_keeps_its_seeds_when_written_again() {
        let dir = std::env::temp_dir().join(format!("pagemesh-auth-test-{}", std::process::id()));
        let first = write_auth_dir(&dir, "127.0.0.1:4222", "pagemesh", &["client".into()]).expect("written");
        let again = write_auth_dir(&dir, "127.0.0.1:4223", "pagemesh", &["client".into()]).expect("rewritten");
        assert_eq!(first.roles, again.roles);
        assert_eq!(first.clients, again.clients);
        let (seed, public) = read_seed(&seed_path(&dir, "client")).expect("a seed");
        assert!(seed.starts_with("SU"));
        assert_eq!(public, first.clients[0].1);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(seed_path(&dir, "scheduler")).expect("seed file").permissions().mode();
        assert_eq!(mode & 0o077, 0, "seeds are private to their owner");
        assert!(write_auth_dir(&dir, "x", "pagemesh", &["scheduler".into()]).is_err());
        assert!(write_auth_dir(&dir, "x", "pagemesh", &["a b".into()]).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
