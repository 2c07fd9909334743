//! The route matcher: a plain type with unit tests. Order of precedence when several routes
//! match a request: higher `priority`, then the more specific host (exact, then the longest
//! wildcard suffix, then any), then the longer path (an exact path before a prefix of the same
//! length), then a route restricted to methods before one that takes all, then file order.

use std::cmp::Reverse;

use http::Method;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMatch {
    Any,
    /// Lowercase, no port.
    Exact(String),
    /// `*.example.com` stored as `.example.com`: any name ending in it, with at least one more
    /// label before it.
    Suffix(String),
}

impl HostMatch {
    pub fn parse(h: &str) -> Result<HostMatch, String> {
        let h = h.trim().to_ascii_lowercase();
        let bad =
            || format!("host {h:?}: expected a name like \"api.example.com\" or \"*.example.com\"");
        if let Some(rest) = h.strip_prefix("*.") {
            if rest.is_empty() || rest.contains('*') || rest.contains(':') {
                return Err(bad());
            }
            return Ok(HostMatch::Suffix(format!(".{rest}")));
        }
        if h.is_empty() || h.contains('*') || h.contains('/') {
            return Err(bad());
        }
        Ok(HostMatch::Exact(h))
    }

    fn matches(&self, host: Option<&str>) -> bool {
        match (self, host) {
            (HostMatch::Any, _) => true,
            (_, None) => false,
            (HostMatch::Exact(e), Some(h)) => e == h,
            (HostMatch::Suffix(s), Some(h)) => h.len() > s.len() && h.ends_with(s.as_str()),
        }
    }

    fn rank(&self) -> (u8, usize) {
        match self {
            HostMatch::Exact(h) => (2, h.len()),
            HostMatch::Suffix(s) => (1, s.len()),
            HostMatch::Any => (0, 0),
        }
    }

    /// Every host `other` matches, `self` matches too.
    fn covers(&self, other: &HostMatch) -> bool {
        match (self, other) {
            (HostMatch::Any, _) => true,
            (HostMatch::Exact(a), HostMatch::Exact(b)) => a == b,
            (HostMatch::Suffix(s), HostMatch::Exact(b)) => {
                b.len() > s.len() && b.ends_with(s.as_str())
            }
            (HostMatch::Suffix(s), HostMatch::Suffix(t)) => t.ends_with(s.as_str()),
            _ => false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathMatch {
    Prefix(String),
    Exact(String),
}

impl PathMatch {
    fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Prefix(p) => path.starts_with(p.as_str()),
            PathMatch::Exact(p) => path == p,
        }
    }

    fn rank(&self) -> (usize, u8) {
        match self {
            PathMatch::Exact(p) => (p.len(), 1),
            PathMatch::Prefix(p) => (p.len(), 0),
        }
    }

    fn covers(&self, other: &PathMatch) -> bool {
        match (self, other) {
            (PathMatch::Prefix(p), PathMatch::Prefix(q) | PathMatch::Exact(q)) => {
                q.starts_with(p.as_str())
            }
            (PathMatch::Exact(p), PathMatch::Exact(q)) => p == q,
            (PathMatch::Exact(_), PathMatch::Prefix(_)) => false,
        }
    }

    /// What `strip_prefix` removes.
    pub fn prefix(&self) -> &str {
        match self {
            PathMatch::Prefix(p) | PathMatch::Exact(p) => p,
        }
    }
}

/// The match part of one route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Matcher {
    pub host: HostMatch,
    pub path: PathMatch,
    /// `None`: every method.
    pub methods: Option<Vec<Method>>,
    pub priority: i32,
    /// The route's position in the configuration.
    pub index: usize,
}

impl Matcher {
    pub fn matches(&self, host: Option<&str>, path: &str, method: &Method) -> bool {
        self.host.matches(host)
            && self.path.matches(path)
            && self.methods.as_ref().is_none_or(|m| m.contains(method))
    }

    /// Every request `other` matches, `self` matches too.
    pub fn covers(&self, other: &Matcher) -> bool {
        let methods = match (&self.methods, &other.methods) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(a), Some(b)) => b.iter().all(|m| a.contains(m)),
        };
        methods && self.host.covers(&other.host) && self.path.covers(&other.path)
    }

    fn key(&self) -> impl Ord {
        (
            Reverse(self.priority),
            Reverse(self.host.rank()),
            Reverse(self.path.rank()),
            Reverse(self.methods.is_some()),
            self.index,
        )
    }

    /// Whether some request for the built-in path could match this route.
    pub fn overlaps_builtin(&self, b: &Builtin) -> bool {
        match (&self.path, b.prefix) {
            (PathMatch::Exact(p), false) => *p == b.path,
            (PathMatch::Exact(p), true) => p.starts_with(&b.path),
            (PathMatch::Prefix(p), false) => b.path.starts_with(p.as_str()),
            (PathMatch::Prefix(p), true) => {
                b.path.starts_with(p.as_str()) || p.starts_with(&b.path)
            }
        }
    }

    /// A route takes a built-in path only with a match at least as specific as the built-in's.
    pub fn claims(&self, b: &Builtin) -> bool {
        self.overlaps_builtin(b) && self.path.prefix().len() >= b.path.len()
    }
}

/// The matchers in precedence order.
pub fn sorted(mut m: Vec<Matcher>) -> Vec<Matcher> {
    m.sort_by_key(|a| a.key());
    m
}

/// A built-in endpoint's path (`/healthz`, `/ws/echo`, or the `/api/` prefix).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Builtin {
    pub path: String,
    pub prefix: bool,
}

impl Builtin {
    pub fn exact(p: &str) -> Builtin {
        Builtin {
            path: p.into(),
            prefix: false,
        }
    }
    pub fn prefix(p: &str) -> Builtin {
        Builtin {
            path: p.into(),
            prefix: true,
        }
    }
    fn hit(&self, path: &str) -> bool {
        if self.prefix {
            path.starts_with(&self.path)
        } else {
            path == self.path
        }
    }
    pub fn display(&self) -> String {
        if self.prefix {
            format!("{}*", self.path)
        } else {
            self.path.clone()
        }
    }
}

/// The compiled table.
#[derive(Debug, Default)]
pub struct Table {
    order: Vec<Matcher>,
    builtins: Vec<Builtin>,
}

impl Table {
    pub fn new(matchers: Vec<Matcher>, builtins: Vec<Builtin>) -> Table {
        Table {
            order: sorted(matchers),
            builtins,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// The route for a request: its index and matcher; `None` for no route, or for a built-in
    /// path the matching route does not claim. `host` is lowercase without a port.
    pub fn find(&self, host: Option<&str>, path: &str, method: &Method) -> Option<&Matcher> {
        let m = self.order.iter().find(|m| m.matches(host, path, method))?;
        match self.builtins.iter().find(|b| b.hit(path)) {
            Some(b) if !m.claims(b) => None,
            _ => Some(m),
        }
    }
}

/// The host a request is for: the TLS server name when there is one, else `Host` (or the
/// URI's authority), lowercase and without the port.
pub fn request_host(sni: Option<&str>, host_header: Option<&str>) -> Option<String> {
    if let Some(s) = sni {
        return Some(s.to_ascii_lowercase());
    }
    let h = host_header?.trim();
    let h = if let Some(rest) = h.strip_prefix('[') {
        // [v6]:port
        rest.split(']').next().unwrap_or(rest)
    } else {
        h.rsplit_once(':').map_or(h, |(host, port)| {
            if port.bytes().all(|b| b.is_ascii_digit()) {
                host
            } else {
                h
            }
        })
    };
    (!h.is_empty()).then(|| h.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(
        host: Option<&str>,
        path: PathMatch,
        methods: Option<&[&str]>,
        priority: i32,
        index: usize,
    ) -> Matcher {
        Matcher {
            host: host.map_or(HostMatch::Any, |h| HostMatch::parse(h).unwrap()),
            path,
            methods: methods.map(|l| {
                l.iter()
                    .map(|s| Method::from_bytes(s.as_bytes()).unwrap())
                    .collect()
            }),
            priority,
            index,
        }
    }
    fn pre(p: &str) -> PathMatch {
        PathMatch::Prefix(p.into())
    }

    #[test]
    fn longest_prefix_wins() {
        let t = Table::new(
            vec![
                m(None, pre("/"), None, 0, 0),
                m(None, pre("/app/"), None, 0, 1),
            ],
            vec![],
        );
        assert_eq!(t.find(None, "/app/x", &Method::GET).unwrap().index, 1);
        assert_eq!(t.find(None, "/other", &Method::GET).unwrap().index, 0);
        assert_eq!(t.find(None, "/app", &Method::GET).unwrap().index, 0);
    }

    #[test]
    fn exact_path_and_methods() {
        let t = Table::new(
            vec![
                m(None, pre("/x"), None, 0, 0),
                m(None, PathMatch::Exact("/x".into()), None, 0, 1),
                m(None, pre("/x"), Some(&["POST"]), 0, 2),
            ],
            vec![],
        );
        assert_eq!(t.find(None, "/x", &Method::GET).unwrap().index, 1);
        assert_eq!(t.find(None, "/xy", &Method::POST).unwrap().index, 2);
        assert_eq!(t.find(None, "/xy", &Method::GET).unwrap().index, 0);
    }

    #[test]
    fn hosts_exact_then_wildcard_then_any() {
        let t = Table::new(
            vec![
                m(None, pre("/"), None, 0, 0),
                m(Some("*.example.com"), pre("/"), None, 0, 1),
                m(Some("api.example.com"), pre("/"), None, 0, 2),
            ],
            vec![],
        );
        assert_eq!(
            t.find(Some("api.example.com"), "/", &Method::GET)
                .unwrap()
                .index,
            2
        );
        assert_eq!(
            t.find(Some("a.b.example.com"), "/", &Method::GET)
                .unwrap()
                .index,
            1
        );
        assert_eq!(
            t.find(Some("example.com"), "/", &Method::GET)
                .unwrap()
                .index,
            0
        );
        assert_eq!(t.find(None, "/", &Method::GET).unwrap().index, 0);
    }

    #[test]
    fn priority_comes_first() {
        let t = Table::new(
            vec![
                m(None, pre("/app/"), None, 0, 0),
                m(None, pre("/"), None, 5, 1),
            ],
            vec![],
        );
        assert_eq!(t.find(None, "/app/x", &Method::GET).unwrap().index, 1);
    }

    #[test]
    fn builtins_stay_unless_claimed() {
        let b = vec![Builtin::exact("/healthz"), Builtin::prefix("/api/")];
        let t = Table::new(vec![m(None, pre("/"), None, 0, 0)], b.clone());
        assert!(t.find(None, "/healthz", &Method::GET).is_none());
        assert!(t.find(None, "/api/publish", &Method::POST).is_none());
        assert!(t.find(None, "/healthzz", &Method::GET).is_some());
        let t = Table::new(vec![m(None, pre("/api/"), None, 0, 0)], b);
        assert!(t.find(None, "/api/publish", &Method::POST).is_some());
    }

    #[test]
    fn host_from_sni_or_header() {
        assert_eq!(
            request_host(Some("A.example"), Some("b")).as_deref(),
            Some("a.example")
        );
        assert_eq!(
            request_host(None, Some("Api.Example:8443")).as_deref(),
            Some("api.example")
        );
        assert_eq!(request_host(None, Some("[::1]:80")).as_deref(), Some("::1"));
        assert_eq!(request_host(None, None), None);
    }

    #[test]
    fn coverage() {
        assert!(m(None, pre("/"), None, 0, 0).covers(&m(
            Some("a.b"),
            pre("/x"),
            Some(&["GET"]),
            0,
            1
        )));
        assert!(!m(None, pre("/x"), Some(&["GET"]), 0, 0).covers(&m(None, pre("/x"), None, 0, 1)));
        assert!(m(Some("*.b.c"), pre("/"), None, 0, 0).covers(&m(
            Some("a.b.c"),
            pre("/"),
            None,
            0,
            1
        )));
        assert!(!m(Some("*.b.c"), pre("/"), None, 0, 0).covers(&m(
            Some("b.c"),
            pre("/"),
            None,
            0,
            1
        )));
    }
}
