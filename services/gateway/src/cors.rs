//! Cross-origin requests (CORS), configured as vLLM's OpenAI server configures them:
//! `--allowed-origins`, `--allowed-methods`, `--allowed-headers` (each a JSON list or a
//! comma-separated list; `*` for any) and `--allow-credentials`. vLLM's defaults allow any
//! origin, method and header without credentials, and so do these.

use actix_cors::Cors;
use clap::Args;

/// The CORS flags.
#[derive(Args, Debug, Clone)]
pub struct CorsArgs {
    /// Origins allowed to call the API from a browser (`*`: any).
    #[arg(long, default_value = "*", value_parser = parse_list)]
    allowed_origins: List,
    /// Methods allowed in cross-origin requests (`*`: any).
    #[arg(long, default_value = "*", value_parser = parse_list)]
    allowed_methods: List,
    /// Headers allowed in cross-origin requests (`*`: any).
    #[arg(long, default_value = "*", value_parser = parse_list)]
    allowed_headers: List,
    /// Allow credentials (cookies, authorization headers) in cross-origin requests.
    #[arg(long)]
    allow_credentials: bool,
}

/// The entries of one list flag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct List(Vec<String>);

impl std::ops::Deref for List {
    type Target = [String];

    fn deref(&self) -> &[String] {
        &self.0
    }
}

/// A list as vLLM takes it (`["a", "b"]`) or comma-separated (`a,b`).
fn parse_list(text: &str) -> Result<List, String> {
    let items: Vec<String> = match text.trim_start().starts_with('[') {
        true => serde_json::from_str(text).map_err(|e| format!("not a JSON list of strings: {e}"))?,
        false => text.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect(),
    };
    if items.is_empty() {
        return Err("the list is empty".into());
    }
    Ok(List(items))
}

/// Whether a list allows anything.
fn any(items: &[String]) -> bool {
    items.iter().any(|s| s == "*")
}

impl CorsArgs {
    /// The middleware for these flags.
    pub fn middleware(&self) -> Cors {
        let mut cors = Cors::default().max_age(600);
        cors = match any(&self.allowed_origins) {
            true => cors.allow_any_origin(),
            false => self.allowed_origins.iter().fold(cors, |c, origin| c.allowed_origin(origin)),
        };
        cors = match any(&self.allowed_methods) {
            true => cors.allow_any_method(),
            false => cors.allowed_methods(self.allowed_methods.iter().map(String::as_str)),
        };
        cors = match any(&self.allowed_headers) {
            true => cors.allow_any_header(),
            false => cors.allowed_headers(self.allowed_headers.iter().map(String::as_str)),
        };
        match self.allow_credentials {
            true => cors.supports_credentials(),
            false => cors,
        }
    }

    /// Checks the lists once at start-up (actix-cors panics on a bad method or header name
    /// when the first request arrives).
    pub fn check(&self) -> Result<(), String> {
        for method in self.allowed_methods.iter().filter(|m| *m != "*") {
            actix_web::http::Method::from_bytes(method.as_bytes())
                .map_err(|_| format!("--allowed-methods: `{method}` is not an HTTP method"))?;
        }
        for header in self.allowed_headers.iter().filter(|h| *h != "*") {
            actix_web::http::header::HeaderName::from_bytes(header.as_bytes())
                .map_err(|_| format!("--allowed-headers: `{header}` is not a header name"))?;
        }
        for origin in self.allowed_origins.iter().filter(|o| *o != "*") {
            let ok = (origin.starts_with("http://") || origin.starts_with("https://"))
                && actix_web::http::header::HeaderValue::from_str(origin).is_ok();
            if !ok {
                return Err(format!("--allowed-origins: `{origin}` is not an origin (scheme://host[:port])"));
            }
        }
        if self.allow_credentials && any(&self.allowed_origins) {
            return Err("--allow-credentials needs --allowed-origins to name the origins (browsers refuse `*` \
                        with credentials)"
                .into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_read_as_json_or_comma_separated() {
        assert_eq!(
            *parse_list(r#"["https://a.example", "http://b:8080"]"#).expect("json"),
            ["https://a.example", "http://b:8080"]
        );
        assert_eq!(*parse_list("GET, POST").expect("commas"), ["GET", "POST"]);
        assert!(parse_list("[1, 2]").is_err());
        assert!(parse_list(" , ").is_err());
    }

    #[test]
    fn bad_entries_are_refused_at_start_up() {
        let args = |origins: &str, methods: &str, credentials: bool| CorsArgs {
            allowed_origins: parse_list(origins).expect("list"),
            allowed_methods: parse_list(methods).expect("list"),
            allowed_headers: List(vec!["*".into()]),
            allow_credentials: credentials,
        };
        assert!(args("*", "*", false).check().is_ok());
        assert!(args("https://app.example", "GET,POST", true).check().is_ok());
        assert!(args("app.example", "*", false).check().is_err());
        assert!(args("*", "GE T", false).check().is_err());
        assert!(args("*", "*", true).check().is_err());
    }
}
