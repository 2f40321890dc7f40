//! Anonymous network namespaces for tests and benchmarks, each lived in by one thread of its
//! own: unshare(2) moves only the calling thread, so the namespace's thread runs every job
//! given to it, on a current-thread tokio runtime with an rtnetlink connection of that
//! namespace. Processes spawned from a job, and threads started by one, are in the namespace
//! too. The namespace vanishes, with every interface in it, once its thread has ended and
//! nothing holds its descriptor: no path leaves one behind, and the host's interfaces are
//! never touched. This module never names a namespace (no `ip netns add`) and never enters one
//! on the caller's thread.
//!
//! It needs root; without it [`Netns::new`] fails (a test must not skip) saying so.

use std::any::Any;
use std::fs::File;
use std::future::Future;
use std::os::fd::OwnedFd;
use std::panic::{self, AssertUnwindSafe};
use std::sync::mpsc;
use std::thread::JoinHandle;

use nix::errno::Errno;
use nix::mount::{mount, MsFlags};
use nix::sched::CloneFlags;
use rtnetlink::Handle;
use tokio::runtime::Runtime;

/// What the namespace's thread sees of the filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filesystem {
    /// The host's mounts: only the network namespace is new. Enough for TAPs and addresses.
    Host,
    /// A private mount namespace too, with `/sys` mounted from the new network namespace
    /// (sysfs shows the network namespace of whoever mounts it: macvtap device numbers, say)
    /// and an empty tmpfs on each of `empty` (`/run` for device nodes made there, or `/dev`
    /// and `/run` to look like a container without udev). Nothing propagates to the host.
    Private {
        /// Directories to hide under an empty tmpfs (mode 755).
        empty: &'static [&'static str],
    },
}

/// Why a namespace could not be made.
#[derive(thiserror::Error)]
pub enum Error {
    #[error("network namespaces need root (CAP_SYS_ADMIN); run the tests or the benchmark as root")]
    NotRoot,
    #[error("could not start the namespace's thread")]
    Thread(#[source] std::io::Error),
    #[error("unshare({flags:?}) failed")]
    Unshare {
        flags: CloneFlags,
        #[source]
        source: Errno,
    },
    #[error("could not mount {what} on {target} in the namespace's mount namespace")]
    Mount {
        what: &'static str,
        target: &'static str,
        #[source]
        source: Errno,
    },
    #[error("could not open the namespace's /proc/thread-self/ns/net")]
    Open(#[source] std::io::Error),
    #[error("could not start the namespace's tokio runtime")]
    Runtime(#[source] std::io::Error),
    #[error("could not open an rtnetlink connection in the namespace")]
    Netlink(#[source] std::io::Error),
    #[error("the namespace's thread ended before it was set up")]
    Died,
}

crate::debug_as_chain!(Error);

type Job = Box<dyn FnOnce(&Runtime, &Handle) + Send>;
type Outcome<T> = Result<T, Box<dyn Any + Send>>;

/// An anonymous network namespace and the one thread that lives in it. Dropping it ends the
/// thread (after the jobs already given) and so the namespace, once no other descriptor of it
/// (from [`Netns::fd`]) is open.
pub struct Netns {
    fd: OwnedFd,
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl Netns {
    /// Makes the namespace on a new thread and waits until it is set up.
    pub fn new(filesystem: Filesystem) -> Result<Netns, Error> {
        if !nix::unistd::geteuid().is_root() {
            return Err(Error::NotRoot);
        }
        let (jobs, queue) = mpsc::channel::<Job>();
        let (ready, started) = mpsc::channel::<Result<OwnedFd, Error>>();
        let thread = std::thread::Builder::new()
            .name("testkit-netns".into())
            .spawn(move || match enter(filesystem) {
                Ok((fd, runtime, handle)) => {
                    let _ = ready.send(Ok(fd));
                    for job in queue {
                        job(&runtime, &handle);
                    }
                }
                Err(err) => {
                    let _ = ready.send(Err(err));
                }
            })
            .map_err(Error::Thread)?;
        let fd = started.recv().map_err(|_| Error::Died)??;
        Ok(Netns { fd, jobs: Some(jobs), thread: Some(thread) })
    }

    /// Runs `job` on the namespace's thread and returns what it returns. A panic in `job`
    /// is passed on to the caller (the thread carries on for later jobs).
    pub fn run<T: Send + 'static>(&self, job: impl FnOnce(&Runtime, &Handle) -> T + Send + 'static) -> T {
        let (reply, result) = mpsc::channel::<Outcome<T>>();
        let job: Job = Box::new(move |runtime, handle| {
            let _ = reply.send(panic::catch_unwind(AssertUnwindSafe(|| job(runtime, handle))));
        });
        self.jobs.as_ref().expect("jobs until drop").send(job).expect("the namespace's thread runs until drop");
        match result.recv().expect("every job replies") {
            Ok(value) => value,
            Err(panic) => panic::resume_unwind(panic),
        }
    }

    /// Runs the future `job` makes on the namespace's runtime; see [`Netns::run`]. The future
    /// is made on the namespace's thread, so it need not be `Send`.
    pub fn block_on<T, F>(&self, job: impl FnOnce(Handle) -> F + Send + 'static) -> T
    where
        T: Send + 'static,
        F: Future<Output = T>,
    {
        self.run(move |runtime, handle| runtime.block_on(job(handle.clone())))
    }

    /// A descriptor of the namespace, to move a link into it (`setns_by_fd`) or to enter it.
    pub fn fd(&self) -> std::io::Result<OwnedFd> {
        self.fd.try_clone()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Moves the calling thread into new namespaces and sets it up; runs on the namespace's thread.
fn enter(filesystem: Filesystem) -> Result<(OwnedFd, Runtime, Handle), Error> {
    let flags = match filesystem {
        Filesystem::Host => CloneFlags::CLONE_NEWNET,
        Filesystem::Private { .. } => CloneFlags::CLONE_NEWNET | CloneFlags::CLONE_NEWNS,
    };
    nix::sched::unshare(flags).map_err(|source| Error::Unshare { flags, source })?;
    if let Filesystem::Private { empty } = filesystem {
        let mount_error = |what, target| move |source| Error::Mount { what, target, source };
        // Private first, so the mounts below never propagate to the host (mount_namespaces(7)).
        mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>)
            .map_err(mount_error("private propagation", "/"))?;
        mount(Some("sysfs"), "/sys", Some("sysfs"), MsFlags::empty(), None::<&str>)
            .map_err(mount_error("sysfs", "/sys"))?;
        for dir in empty {
            mount(Some("tmpfs"), *dir, Some("tmpfs"), MsFlags::empty(), Some("mode=755"))
                .map_err(mount_error("an empty tmpfs", dir))?;
        }
    }
    let netns = File::open("/proc/thread-self/ns/net").map_err(Error::Open)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(Error::Runtime)?;
    let handle = runtime.block_on(async {
        let (connection, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(connection);
        Ok::<_, std::io::Error>(handle)
    });
    Ok((OwnedFd::from(netns), runtime, handle.map_err(Error::Netlink)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The network namespace of the calling thread, as its inode number.
    fn current_netns() -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata("/proc/thread-self/ns/net").unwrap().ino()
    }

    /// Run as root, it makes namespaces; otherwise it fails saying it needs root.
    fn made(filesystem: Filesystem) -> Netns {
        let made = Netns::new(filesystem);
        if let (false, Err(err)) = (nix::unistd::geteuid().is_root(), &made) {
            assert!(format!("{err:?}").contains("need root"), "{err:?}");
        }
        made.unwrap()
    }

    #[test]
    fn jobs_run_in_a_namespace_of_their_own_sync_and_async() {
        let host = current_netns();
        let netns = made(Filesystem::Host);
        let inside = netns.run(|_, _| current_netns());
        assert_ne!(inside, host);
        assert_eq!(netns.run(|_, _| current_netns()), inside, "one thread, one namespace");
        let names = netns.block_on(|handle| async move {
            use futures::TryStreamExt;
            let mut names = Vec::new();
            let mut links = handle.link().get().execute();
            while let Some(link) = links.try_next().await.unwrap() {
                names.extend(link.attributes.into_iter().filter_map(|a| match a {
                    rtnetlink::packet_route::link::LinkAttribute::IfName(name) => Some(name),
                    _ => None,
                }));
            }
            names
        });
        assert_eq!(names, ["lo"], "a new namespace holds only lo");
        // Its descriptor names the same namespace.
        use std::os::unix::fs::MetadataExt;
        let fd = File::from(netns.fd().unwrap());
        assert_eq!(fd.metadata().unwrap().ino(), inside);
    }

    #[test]
    fn a_private_filesystem_has_its_own_sysfs_and_empty_directories() {
        let netns = made(Filesystem::Private { empty: &["/run"] });
        let (net, run) = netns.run(|_, _| {
            let net: Vec<String> = std::fs::read_dir("/sys/class/net")
                .unwrap()
                .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            (net, std::fs::read_dir("/run").unwrap().count())
        });
        assert_eq!(net, ["lo"], "sysfs of the new namespace");
        assert_eq!(run, 0, "/run is an empty tmpfs");
        // The caller's thread still sees the host's /run.
        assert!(std::path::Path::new("/run").read_dir().unwrap().next().is_some());
    }

    #[test]
    fn a_panic_in_a_job_reaches_the_caller_and_the_thread_carries_on() {
        let netns = made(Filesystem::Host);
        let panicked = panic::catch_unwind(AssertUnwindSafe(|| netns.run(|_, _| panic!("on purpose"))));
        let message = panicked.unwrap_err();
        assert_eq!(message.downcast_ref::<&str>(), Some(&"on purpose"));
        assert_eq!(netns.run(|_, _| 42), 42);
    }
}
