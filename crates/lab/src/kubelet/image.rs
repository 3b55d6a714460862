//! The lab's "images": a local map from image name to a program, since the
//! lab has no registry and no container runtime.
//!
//! | image (any tag) | runs |
//! |---|---|
//! | `meshless.dev/echo` | `meshless-labtool http-echo --listen [::]:<first containerPort, else 8080>` |
//! | `meshless.dev/labtool` | `meshless-labtool <command...> <args...>` |
//! | anything else | nothing: the container waits with reason `ErrImagePull` |

use std::path::PathBuf;

use k8s_openapi::api::core::v1::{Container, Pod};

use crate::context::Ctx;

/// What to exec for a container.
#[derive(Debug, Clone)]
pub struct Program {
    pub path: PathBuf,
    pub args: Vec<String>,
}

/// The image name without tag or digest: `meshless.dev/echo:1` -> `meshless.dev/echo`.
fn repository(image: &str) -> &str {
    let image = image.split('@').next().unwrap_or(image);
    match image.rfind(':') {
        Some(i) if !image[i..].contains('/') => &image[..i],
        _ => image,
    }
}

/// The program for `c`, or the message an ErrImagePull status carries.
pub fn resolve(ctx: &Ctx, c: &Container) -> Result<Program, String> {
    let image = c.image.as_deref().unwrap_or_default();
    match repository(image) {
        "meshless.dev/echo" => {
            let port = c
                .ports
                .as_ref()
                .and_then(|p| p.first())
                .map_or(8080, |p| p.container_port);
            Ok(Program {
                path: ctx.labtool.clone(),
                args: vec![
                    "http-echo".into(),
                    "--listen".into(),
                    format!("[::]:{port}"),
                ],
            })
        }
        "meshless.dev/labtool" => Ok(Program {
            path: ctx.labtool.clone(),
            args: c
                .command
                .iter()
                .flatten()
                .chain(c.args.iter().flatten())
                .cloned()
                .collect(),
        }),
        _ => Err(format!(
            "image {image:?} is not in the lab's image map; the lab kubelet runs only \
             meshless.dev/echo and meshless.dev/labtool (docs/book/src/reference/lab-kubelet.md)"
        )),
    }
}

/// The container's environment: HOSTNAME like a real pod, then `env` with
/// `valueFrom.fieldRef` resolved (metadata.name, metadata.namespace,
/// metadata.uid, status.podIP, status.hostIP, spec.nodeName,
/// spec.serviceAccountName). Unsupported sources resolve to "".
pub fn env(pod: &Pod, c: &Container, pod_ip: &str, host_ip: &str) -> Vec<(String, String)> {
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    let mut out = vec![("HOSTNAME".to_owned(), meta.name.clone().unwrap_or_default())];
    for e in c.env.iter().flatten() {
        let value = match (&e.value, &e.value_from) {
            (Some(v), _) => v.clone(),
            (None, Some(from)) => match from.field_ref.as_ref().map(|f| f.field_path.as_str()) {
                Some("metadata.name") => meta.name.clone().unwrap_or_default(),
                Some("metadata.namespace") => meta.namespace.clone().unwrap_or_default(),
                Some("metadata.uid") => meta.uid.clone().unwrap_or_default(),
                Some("status.podIP") => pod_ip.to_owned(),
                Some("status.hostIP") => host_ip.to_owned(),
                Some("spec.nodeName") => spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
                Some("spec.serviceAccountName") => spec
                    .and_then(|s| s.service_account_name.clone())
                    .unwrap_or_default(),
                _ => String::new(),
            },
            (None, None) => String::new(),
        };
        out.push((e.name.clone(), value));
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn strips_tags_and_digests() {
        assert_eq!(
            super::repository("meshless.dev/echo:1.2"),
            "meshless.dev/echo"
        );
        assert_eq!(super::repository("meshless.dev/echo"), "meshless.dev/echo");
        assert_eq!(super::repository("reg:5000/x/y"), "reg:5000/x/y");
        assert_eq!(super::repository("a/b@sha256:00"), "a/b");
    }
}
