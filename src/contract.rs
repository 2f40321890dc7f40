//! The endpoint container contract (the README's "The endpoint contract") from the outside: the `docker run` arguments
//! that start an endpoint container. Every tool that starts one (the image tests, `cargo
//! xtask bench`, a lesson launcher) takes them from here, so they cannot drift apart.

use std::path::Path;

/// One endpoint container to start.
#[derive(Debug, Clone)]
pub struct DockerRun<'a> {
    /// The container's name.
    pub name: &'a str,
    /// The endpoint image.
    pub image: &'a str,
    /// The Docker network its eth0 joins (management).
    pub network: &'a str,
    /// The lesson directory, mounted read-only at `/antidote`.
    pub lesson: &'a Path,
    /// `docker run` arguments of the caller's own (`--hostname`, `-e VIAL_...`), placed
    /// before the image.
    pub extra: &'a [&'a str],
}

impl DockerRun<'_> {
    /// `run -d ...` (without the `docker` itself): detached, `/dev/net/tun` and `NET_ADMIN`
    /// (what vial needs for the data plane), the lesson directory, the network.
    pub fn args(&self) -> Vec<String> {
        let mut args: Vec<String> = [
            "run",
            "-d",
            "--name",
            self.name,
            "--device",
            "/dev/net/tun",
            "--cap-add",
            "NET_ADMIN",
            "--network",
            self.network,
            "-v",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push(format!("{}:/antidote:ro", self.lesson.display()));
        args.extend(self.extra.iter().map(|s| s.to_string()));
        args.push(self.image.to_string());
        args
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_contract_as_docker_run_arguments() {
        let run = DockerRun {
            name: "r1",
            image: "vial/frr",
            network: "lab",
            lesson: Path::new("/lessons/ospf"),
            extra: &["--hostname", "r1"],
        };
        assert_eq!(
            run.args().join(" "),
            "run -d --name r1 --device /dev/net/tun --cap-add NET_ADMIN --network lab \
             -v /lessons/ospf:/antidote:ro --hostname r1 vial/frr"
        );
    }
}
