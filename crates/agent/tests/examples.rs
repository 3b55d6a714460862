//! Unit tier: every manifest in examples/services parses and compiles
//! without errors, to the frontends its comments promise.

use std::net::IpAddr;

use meshless_agent::source::parse_manifests;

fn compile(file: &str) -> meshless_lb::Compiled {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples/services")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let objects = parse_manifests(&text, file).unwrap_or_else(|e| panic!("{e}"));
    let node = meshless_lb::NodeContext {
        node_name: "demo-n1".into(),
        node_ips: vec!["198.18.0.11".parse::<IpAddr>().expect("ip")],
        zone: None,
    };
    meshless_lb::compile(
        &node,
        &objects.services,
        &objects.slices,
        &meshless_lb::CompileOptions::default(),
    )
}

#[test]
fn examples_parse_and_compile() {
    let web = compile("web.yaml");
    assert!(web.errors.is_empty(), "{:?}", web.errors);
    // ClusterIP x 2 families x 2 ports, NodePort (IPv4 node address) x 2
    // ports, LoadBalancer IP x 2 ports.
    assert_eq!(web.services.len(), 8, "{:#?}", web.services.keys());
    assert!(
        web.services.values().all(|s| s.backends.len() == 3),
        "three backends each"
    );

    let canary = compile("weighted-canary.yaml");
    assert!(canary.errors.is_empty(), "{:?}", canary.errors);
    assert_eq!(canary.services.len(), 1);
    assert!(
        canary.services.values().all(|s| s.backends.is_empty()),
        "no EndpointSlice in the file: nothing to balance yet"
    );
}
