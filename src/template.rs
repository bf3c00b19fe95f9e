//! The Secret's type and data as templates (MiniJinja), rendered in the operator with the key in
//! hand. The built-in formats are templates too, so every layout takes one code path. Pure: no
//! client, no clock.
//!
//! The engine is sandboxed by construction: no file, network or environment access, no
//! `include` (no loader), strict undefined values, and a fuel budget that bounds both the
//! instructions and the memory a render may use. An error never carries rendered output, and
//! with the real key not even the engine's own detail: only the entry, line and column.

use std::{collections::BTreeMap, fmt};

use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use minijinja::{AutoEscape, Environment, ErrorKind, UndefinedBehavior, Value, syntax::SyntaxConfig};
use sha2::Sha256;

use crate::{
    crd::{SecretFormat, SecretSpec},
    iam::SecretAccessKey,
};

/// Fuel of one entry's render: about that many instructions, or 64 times that many bytes of
/// values (MiniJinja charges both), so a few milliseconds and a few MB at most.
pub const FUEL: u64 = 100_000;
/// Most bytes the rendered data may take together: half of what a Secret may hold (1 MiB),
/// leaving room for its metadata.
pub const MAX_RENDERED_SIZE: usize = 512 * 1024;

/// What the dry run renders with: AWS's documentation examples (the lengths of real values),
/// so a template that renders with them renders with a real key.
pub const PLACEHOLDER_ACCESS_KEY_ID: &str = "AKIAIOSFODNN7EXAMPLE";
pub const PLACEHOLDER_SECRET: &str = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";
pub const PLACEHOLDER_ACCOUNT: &str = "123456789012";

/// A layout: the Secret's type and a template per data key.
#[derive(Clone, Debug, PartialEq)]
pub struct Layout {
    pub type_: String,
    pub data: BTreeMap<String, String>,
}

impl Layout {
    /// The spec's template, or the built-in one its `format` names.
    pub fn of(spec: &SecretSpec) -> Layout {
        if let Some(t) = &spec.template {
            return Layout { type_: t.type_.clone().unwrap_or_else(|| "Opaque".into()), data: t.data.clone() };
        }
        let data: &[(&str, &str)] = match spec.format {
            SecretFormat::Env => {
                &[("AWS_ACCESS_KEY_ID", "{{ access_key_id }}"), ("AWS_SECRET_ACCESS_KEY", "{{ secret_access_key }}")]
            }
            SecretFormat::CredentialsFile => &[(
                "credentials",
                "[{{ profile }}]\naws_access_key_id = {{ access_key_id }}\naws_secret_access_key = {{ secret_access_key }}\n",
            )],
        };
        Layout { type_: "Opaque".into(), data: data.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect() }
    }
}

/// Everything a template can read.
pub struct Inputs<'a> {
    pub access_key_id: &'a str,
    pub secret: &'a SecretAccessKey,
    pub user_name: &'a str,
    /// `arn:aws:iam::<account>:user/<path><name>`, as IAM and STS name the user.
    pub user_arn: &'a str,
    pub profile: &'a str,
    pub namespace: &'a str,
    pub name: &'a str,
    pub secret_name: &'a str,
}

impl Inputs<'_> {
    fn context(&self) -> Value {
        // The account is the ARN's fifth field.
        let account_id = self.user_arn.split(':').nth(4).unwrap_or_default();
        let values = [
            ("access_key_id", self.access_key_id),
            ("secret_access_key", self.secret.expose()),
            ("user_name", self.user_name),
            ("user_arn", self.user_arn),
            ("account_id", account_id),
            ("profile", self.profile),
            ("namespace", self.namespace),
            ("name", self.name),
            ("secret_name", self.secret_name),
        ];
        Value::from(values.into_iter().map(|(k, v)| (k, Value::from(v))).collect::<BTreeMap<_, _>>())
    }
}

/// The rendered data, and where in it the secret access key stands verbatim (if it does).
pub struct Rendered {
    pub type_: String,
    pub data: BTreeMap<String, Vec<u8>>,
    pub locator: Option<Locator>,
}

/// Where the secret access key stands in the rendered data: enough to read it back for a new
/// layout of the same key, never the secret itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Locator {
    pub key: String,
    pub offset: usize,
    pub len: usize,
}

impl fmt::Display for Locator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.key, self.offset, self.len)
    }
}

impl Locator {
    pub fn parse(s: &str) -> Option<Locator> {
        let mut parts = s.rsplitn(3, ':');
        let len = parts.next()?.parse().ok()?;
        let offset = parts.next()?.parse().ok()?;
        Some(Locator { key: parts.next()?.to_owned(), offset, len })
    }

    /// The secret from data written with this locator, if it still looks like one.
    pub fn read(&self, data: &BTreeMap<String, Vec<u8>>) -> Option<SecretAccessKey> {
        let bytes = data.get(&self.key)?.get(self.offset..self.offset.checked_add(self.len)?)?;
        let secret = std::str::from_utf8(bytes).ok()?;
        let plausible = !secret.is_empty() && secret.bytes().all(|b| b.is_ascii_alphanumeric() || b"/+=".contains(&b));
        plausible.then(|| SecretAccessKey::new(secret.to_owned()))
    }
}

/// Whether a render uses placeholders (the engine's message may be shown) or the real key (it
/// may not: a message could quote a value).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Values {
    Placeholders,
    Real,
}

/// A template that does not render: which entry, where, and what (never rendered output).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TemplateError {
    pub key: Option<String>,
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub problem: String,
}

impl fmt::Display for TemplateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.key {
            Some(key) => write!(f, "spec.secret.template.data[{key:?}]")?,
            None => f.write_str("spec.secret.template")?,
        }
        if let Some(line) = self.line {
            write!(f, " line {line}")?;
        }
        if let Some(column) = self.column {
            write!(f, ", column {column}")?;
        }
        write!(f, ": {}", self.problem)
    }
}

fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    // Debug mode would keep the variables in scope (the secret) in every error.
    env.set_debug(false);
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_fuel(Some(FUEL));
    // Data keys end in anything (`.html`, `.xml`): no escaping by name.
    env.set_auto_escape_callback(|_| AutoEscape::None);
    // Files end with their newline, as written in YAML block scalars.
    let syntax = SyntaxConfig::builder().keep_trailing_newline(true).build();
    if let Ok(syntax) = syntax {
        env.set_syntax(syntax);
    }
    env.add_function("ses_smtp_password", |secret: &str, region: &str| {
        ses_smtp_password(secret, region).map_err(|why| minijinja::Error::new(ErrorKind::InvalidOperation, why))
    });
    env.add_filter("b64encode", |s: &str| base64::engine::general_purpose::STANDARD.encode(s));
    env
}

/// Render every entry of `layout`; the first that fails names itself.
pub fn render(layout: &Layout, inputs: &Inputs, values: Values) -> Result<Rendered, TemplateError> {
    let env = environment();
    let context = inputs.context();
    let mut data = BTreeMap::new();
    let mut size = 0;
    for (key, source) in &layout.data {
        let fail = |e: minijinja::Error| located(key, source, &e, values);
        let out = env.template_from_named_str(key, source).and_then(|t| t.render(&context)).map_err(fail)?;
        size += key.len() + out.len();
        if size > MAX_RENDERED_SIZE {
            return Err(TemplateError {
                key: Some(key.clone()),
                line: None,
                column: None,
                problem: format!(
                    "the data renders to more than {} KiB, more than a Secret can carry beside its metadata: make it smaller",
                    MAX_RENDERED_SIZE / 1024
                ),
            });
        }
        data.insert(key.clone(), out.into_bytes());
    }
    let secret = inputs.secret.expose().as_bytes();
    let locator = data.iter().find_map(|(key, value)| {
        let offset = value.windows(secret.len()).position(|w| w == secret)?;
        Some(Locator { key: key.clone(), offset, len: secret.len() })
    });
    Ok(Rendered { type_: layout.type_.clone(), data, locator })
}

/// The entry, line and column of an engine error; its own words only for placeholder values.
fn located(key: &str, source: &str, e: &minijinja::Error, values: Values) -> TemplateError {
    let column = e.range().map(|r| {
        let start = r.start.min(source.len());
        let line_start = source[..start].rfind('\n').map_or(0, |i| i + 1);
        source[line_start..start].chars().count() + 1
    });
    let what = match e.kind() {
        ErrorKind::OutOfFuel => format!("{} (more than {FUEL} steps): simplify it", e.kind()),
        kind => match (values, e.detail()) {
            (Values::Placeholders, Some(detail)) => format!("{kind}: {detail}"),
            (Values::Placeholders, None) => kind.to_string(),
            (Values::Real, _) => {
                format!("{kind} with the key's own values, though it renders with placeholder values")
            }
        },
    };
    TemplateError {
        key: Some(key.to_owned()),
        line: e.line(),
        column,
        problem: format!("{what}; fix the template (no key is created until it renders)"),
    }
}

/// The SES SMTP password of a secret access key for `region` (AWS's SigV4-based derivation):
/// HMAC-SHA256 over the date "11111111", the region, "ses", "aws4_request" and "SendRawEmail",
/// keyed first with "AWS4" + the secret; then the version byte 4 before it, in base64.
pub fn ses_smtp_password(secret: &str, region: &str) -> Result<String, String> {
    let valid_region = !region.is_empty()
        && region.len() <= 32
        && region.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !valid_region {
        return Err("ses_smtp_password: the region must be an AWS region name such as eu-west-1".into());
    }
    let sign = |key: &[u8], message: &str| -> Vec<u8> {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes a key of any length");
        mac.update(message.as_bytes());
        mac.finalize().into_bytes().to_vec()
    };
    let mut signature = format!("AWS4{secret}").into_bytes();
    for message in ["11111111", region, "ses", "aws4_request", "SendRawEmail"] {
        signature = sign(&signature, message);
    }
    let mut versioned = vec![0x04];
    versioned.extend_from_slice(&signature);
    Ok(base64::engine::general_purpose::STANDARD.encode(versioned))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(secret: &SecretAccessKey) -> Inputs<'_> {
        Inputs {
            access_key_id: "AKIA0000000000000001",
            secret,
            user_name: "mailer",
            user_arn: "arn:aws:iam::210987654321:user/k8s/team/mailer",
            profile: "ci",
            namespace: "team",
            name: "mail",
            secret_name: "mail-aws",
        }
    }

    fn layout(entries: &[(&str, &str)]) -> Layout {
        Layout { type_: "Opaque".into(), data: entries.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect() }
    }

    fn text(r: &Rendered, key: &str) -> String {
        String::from_utf8(r.data[key].clone()).unwrap()
    }

    /// Published vectors: terraform-provider-aws (internal/service/iam/access_key_test.go,
    /// TestSESSMTPPasswordFromSecretKeySigV4) and the AWS SDK for PHP
    /// (tests/Ses/SesClientTest.php, testCanGenerateSmtpPasswordV4FromCredentials).
    #[test]
    fn the_ses_smtp_password_matches_published_vectors() {
        for (region, secret, expected) in [
            ("eu-central-1", "some+secret+key", "BMXhUYlu5Z3gSXVQORxlVa7XPaz91aGWdfHxvkOZdWZ2"),
            ("eu-central-1", "another+secret+key", "BBbphbrQmrKMx42d1N6+C7VINYEBGI5v9VsZeTxwskfh"),
            ("us-west-1", "some+secret+key", "BH+jbMzper5WwlwUar9E1ySBqHa9whi0GPo+sJ0mVYJj"),
            ("us-west-1", "another+secret+key", "BKVmjjMDFk/qqw8EROW99bjCS65PF8WKvK5bSr4Y6EqF"),
            ("us-east-2", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "BMPPgbAHoFVbze1Ud0oA5uNdXRwUXUZ+qOwphGJbl/cS"),
        ] {
            assert_eq!(ses_smtp_password(secret, region).unwrap(), expected, "{region} {secret}");
        }
        assert!(ses_smtp_password("x", "").is_err());
        assert!(ses_smtp_password("x", "EU West").is_err());
    }

    #[test]
    fn the_built_in_formats_are_templates() {
        let secret = SecretAccessKey::new("s3cr3t".into());
        let mut spec = SecretSpec::default();
        let env = render(&Layout::of(&spec), &inputs(&secret), Values::Real).unwrap();
        assert_eq!(text(&env, "AWS_ACCESS_KEY_ID"), "AKIA0000000000000001");
        assert_eq!(text(&env, "AWS_SECRET_ACCESS_KEY"), "s3cr3t");
        assert_eq!(env.locator, Some(Locator { key: "AWS_SECRET_ACCESS_KEY".into(), offset: 0, len: 6 }));
        spec.format = SecretFormat::CredentialsFile;
        let file = render(&Layout::of(&spec), &inputs(&secret), Values::Real).unwrap();
        assert_eq!(
            text(&file, "credentials"),
            "[ci]\naws_access_key_id = AKIA0000000000000001\naws_secret_access_key = s3cr3t\n"
        );
        assert_eq!(file.type_, "Opaque");
        let locator = file.locator.unwrap();
        assert_eq!(Locator::parse(&locator.to_string()), Some(locator.clone()));
        assert_eq!(locator.read(&file.data).unwrap().expose(), "s3cr3t");
    }

    #[test]
    fn templates_see_every_input_and_the_functions() {
        let secret = SecretAccessKey::new("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY".into());
        let r = render(
            &layout(&[
                (
                    "account",
                    "{{ account_id }}/{{ user_arn }}/{{ user_name }}/{{ namespace }}/{{ name }}/{{ secret_name }}",
                ),
                ("json", "{{ {'id': access_key_id, 'secret': secret_access_key} | tojson }}"),
                ("smtp", "{{ ses_smtp_password(secret_access_key, 'us-east-2') }}"),
                ("b64", "{{ access_key_id | b64encode }}"),
                ("static", "eu-west-1"),
            ]),
            &inputs(&secret),
            Values::Real,
        )
        .unwrap();
        assert_eq!(
            text(&r, "account"),
            "210987654321/arn:aws:iam::210987654321:user/k8s/team/mailer/mailer/team/mail/mail-aws"
        );
        let json: serde_json::Value = serde_json::from_slice(&r.data["json"]).unwrap();
        assert_eq!(json["secret"], "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY");
        assert_eq!(text(&r, "smtp"), "BMPPgbAHoFVbze1Ud0oA5uNdXRwUXUZ+qOwphGJbl/cS");
        assert_eq!(text(&r, "b64"), "QUtJQTAwMDAwMDAwMDAwMDAwMDE=");
        assert_eq!(text(&r, "static"), "eu-west-1");
        assert_eq!(r.locator.map(|l| l.key), Some("json".into()), "the secret stands verbatim in the JSON");
    }

    #[test]
    fn a_derived_only_layout_has_no_locator() {
        let secret = SecretAccessKey::new("s3cr3t".into());
        let r = render(
            &layout(&[("password", "{{ ses_smtp_password(secret_access_key, 'eu-west-1') }}")]),
            &inputs(&secret),
            Values::Real,
        )
        .unwrap();
        assert_eq!(r.locator, None);
    }

    #[test]
    fn an_error_names_the_entry_line_and_column_and_never_the_values() {
        let secret = SecretAccessKey::new("s3cr3t".into());
        let broken = layout(&[("ok", "fine"), ("config", "[default]\nregion = {{ regoin }}\n")]);
        let e = render(&broken, &inputs(&secret), Values::Placeholders).err().unwrap();
        assert_eq!((e.key.as_deref(), e.line, e.column), (Some("config"), Some(2), Some(13)));
        assert!(
            e.to_string().starts_with(r#"spec.secret.template.data["config"] line 2, column 13: undefined value"#),
            "{e}"
        );
        let syntax = render(&layout(&[("x", "{% if %}")]), &inputs(&secret), Values::Placeholders).err().unwrap();
        assert!(syntax.problem.starts_with("syntax error"), "{syntax}");
        let filter = render(&layout(&[("x", "{{ 1 | nope }}")]), &inputs(&secret), Values::Placeholders).err().unwrap();
        assert!(filter.problem.contains("nope"), "{filter}");
        // With the real key the engine's detail is left out: it could quote a value.
        let quoting = layout(&[("x", "{{ secret_access_key | int }}")]);
        let real = render(&quoting, &inputs(&secret), Values::Real).err().unwrap();
        assert!(!real.to_string().contains("s3cr3t"), "{real}");
        assert!(real.problem.contains("placeholder"), "{real}");
        // No file or template access.
        let include = render(&layout(&[("x", "{% include '/etc/passwd' %}")]), &inputs(&secret), Values::Placeholders);
        assert!(include.is_err());
    }

    #[test]
    fn work_and_size_are_bounded() {
        let secret = SecretAccessKey::new("s3cr3t".into());
        let endless =
            layout(&[("x", "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}")]);
        let e = render(&endless, &inputs(&secret), Values::Placeholders).err().unwrap();
        assert!(e.problem.contains("fuel"), "{e}");
        // Memory is fuel too: a value of gigabytes is refused before it is made.
        let huge = layout(&[("x", "{% set a = 'x' * 100000000 %}{{ a ~ a ~ a }}")]);
        assert!(render(&huge, &inputs(&secret), Values::Placeholders).is_err());
        // Within the fuel, the rendered data is still bounded.
        let big = layout(&[("a", "{{ 'x' * 300000 }}"), ("b", "{{ 'x' * 300000 }}")]);
        let e = render(&big, &inputs(&secret), Values::Placeholders).err().unwrap();
        assert_eq!(e.key.as_deref(), Some("b"));
        assert!(e.problem.contains("512 KiB"), "{e}");
    }

    #[test]
    fn a_locator_reads_only_what_looks_like_a_secret() {
        let data = BTreeMap::from([("k".to_string(), b"ab/+=cd\xff".to_vec())]);
        let at = |offset, len| Locator { key: "k".into(), offset, len };
        assert_eq!(at(0, 5).read(&data).unwrap().expose(), "ab/+=");
        assert!(at(0, 8).read(&data).is_none(), "not UTF-8");
        assert!(at(5, 9).read(&data).is_none(), "out of range");
        assert!(at(usize::MAX, 2).read(&data).is_none(), "overflow");
        assert!(Locator { key: "other".into(), offset: 0, len: 1 }.read(&data).is_none());
        assert_eq!(Locator::parse("a.b:1:2"), Some(Locator { key: "a.b".into(), offset: 1, len: 2 }));
        assert_eq!(Locator::parse("nonsense"), None);
    }
}
