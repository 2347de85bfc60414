//! The built-in profiles and templates: the repository's top-level `profiles/` and
//! `templates/`, compiled into the binary so that a desired repo need not copy them.

/// `(name, contents)` of each built-in profile.
pub(super) const PROFILES: &[(&str, &str)] = &[
    ("CS0", include_str!("../../../profiles/CS0.yaml")),
    ("CS1", include_str!("../../../profiles/CS1.yaml")),
    ("CS2", include_str!("../../../profiles/CS2.yaml")),
    ("CS3", include_str!("../../../profiles/CS3.yaml")),
    ("CS4", include_str!("../../../profiles/CS4.yaml")),
    ("CS5", include_str!("../../../profiles/CS5.yaml")),
];

/// `(name, contents)` of each built-in template.
pub(super) const TEMPLATES: &[(&str, &str)] = &[
    ("CS0", include_str!("../../../templates/CS0.conf")),
    ("CS1", include_str!("../../../templates/CS1.conf")),
    ("CS2", include_str!("../../../templates/CS2.conf")),
    ("CS3", include_str!("../../../templates/CS3.conf")),
    ("CS4", include_str!("../../../templates/CS4.conf")),
    ("CS5", include_str!("../../../templates/CS5.conf")),
];
