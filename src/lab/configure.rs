//! Stage configuration, with antidote-core's configurator contract: for each endpoint that has
//! a `configurationType`, its file in `stage<N>/configs/` runs in a configurator container on
//! the lesson's management network, with the lesson at `/antidote` and the target in
//! `ANTIDOTE_TARGET_HOST` (and `SYRINGE_TARGET_HOST`, its older name), `ANTIDOTE_TARGET_USERNAME`, `ANTIDOTE_TARGET_PASSWORD`: python runs
//! the script, ansible runs `ansible-playbook -i HOST, FILE`, napalm merges and commits the
//! file with the driver its name gives. `command` is pure; `configure` runs it.

use std::path::Path;

use super::plan::{EndpointPlan, Plan, ENDPOINT_LABEL};
use super::runtime::{Bind, ContainerSpec, Runtime, RuntimeError};

/// How many lines of a failed configuration's output are shown.
const OUTPUT_LINES: usize = 40;

/// Why an endpoint could not be configured.
#[derive(Debug, thiserror::Error)]
pub enum ConfigureError {
    /// No file for the endpoint in the stage.
    #[error("endpoint {endpoint}: no {kind} configuration for stage {stage} in {}", configs.display())]
    NoFile {
        /// The endpoint.
        endpoint: String,
        /// Its configuration type.
        kind: String,
        /// The stage.
        stage: usize,
        /// The folder looked in.
        configs: std::path::PathBuf,
    },
    /// The engine failed.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// The configuration ran and failed.
    #[error("endpoint {endpoint}: {file} exited with {code}; its output:\n{output}")]
    Failed {
        /// The endpoint.
        endpoint: String,
        /// The file, relative to the lesson.
        file: String,
        /// Its exit code.
        code: i64,
        /// The last lines it printed.
        output: String,
    },
}

/// The file (relative to the lesson) and the command that configure `endpoint` for `stage`,
/// or `None` when it has no configuration type.
pub fn command(
    lesson_dir: &Path,
    endpoint: &EndpointPlan,
    stage: usize,
) -> Result<Option<(String, Vec<String>)>, ConfigureError> {
    let Some(kind) = endpoint.configuration.as_deref() else { return Ok(None) };
    let name = &endpoint.name;
    let configs = format!("stage{stage}/configs");
    let missing = || ConfigureError::NoFile {
        endpoint: name.clone(),
        kind: kind.into(),
        stage,
        configs: lesson_dir.join(&configs),
    };
    let (file, argv): (String, Vec<String>) = match kind {
        "python" => {
            let file = format!("{configs}/{name}.py");
            (file.clone(), vec!["python3".into(), format!("/antidote/{file}")])
        }
        "ansible" => {
            let file = format!("{configs}/{name}.yml");
            (
                file.clone(),
                vec!["ansible-playbook".into(), "-i".into(), format!("{name},"), format!("/antidote/{file}")],
            )
        }
        _ => {
            let driver = crate::lesson::napalm_driver(&lesson_dir.join(&configs), name).ok_or_else(missing)?;
            let file = format!("{configs}/{name}-{driver}.txt");
            let argv = vec![
                "sh".into(),
                "-c".into(),
                format!(
                    "napalm --user \"$ANTIDOTE_TARGET_USERNAME\" --password \"$ANTIDOTE_TARGET_PASSWORD\" --vendor {driver} \
                     \"$ANTIDOTE_TARGET_HOST\" configure /antidote/{file} --strategy merge"
                ),
            ];
            (file, argv)
        }
    };
    if !lesson_dir.join(&file).is_file() {
        return Err(missing());
    }
    Ok(Some((file, argv)))
}

/// Configures `endpoint` of the running lesson `plan` for `stage` with `configurator`; the
/// lesson lives in `lesson_dir`. Returns the file that ran, if any.
pub async fn configure<R: Runtime>(
    runtime: &R,
    plan: &Plan,
    lesson_dir: &Path,
    configurator: &str,
    endpoint: &EndpointPlan,
    stage: usize,
) -> Result<Option<String>, ConfigureError> {
    let Some((file, argv)) = command(lesson_dir, endpoint, stage)? else { return Ok(None) };
    let (user, password) =
        endpoint.credentials.clone().unwrap_or_else(|| ("antidote".into(), "antidotepassword".into()));
    let name = format!("{}-config{stage}", endpoint.container);
    let spec = ContainerSpec {
        name: name.clone(),
        hostname: format!("{}-config", endpoint.name),
        image: configurator.to_string(),
        env: vec![
            format!("ANTIDOTE_TARGET_HOST={}", endpoint.name),
            // The name Syringe, antidote-core's predecessor, gave it: the curriculum's frr
            // scripts still read it.
            format!("SYRINGE_TARGET_HOST={}", endpoint.name),
            format!("ANTIDOTE_TARGET_USERNAME={user}"),
            format!("ANTIDOTE_TARGET_PASSWORD={password}"),
        ],
        labels: plan.labels(&[(ENDPOINT_LABEL, &format!("{}-config", endpoint.name))]),
        network: plan.network.clone(),
        binds: vec![Bind { host: lesson_dir.to_path_buf(), container: "/antidote".into(), read_only: true }],
        cmd: Some(argv),
        ..Default::default()
    };
    runtime.remove(&name).await?;
    runtime.create(&spec).await?;
    let ran = async {
        runtime.start(&name).await?;
        let code = runtime.wait(&name).await?;
        let output = runtime.logs(&name, OUTPUT_LINES).await?;
        Ok::<_, RuntimeError>((code, output))
    }
    .await;
    runtime.remove(&name).await?;
    let (code, output) = ran?;
    if code != 0 {
        return Err(ConfigureError::Failed { endpoint: endpoint.name.clone(), file, code, output });
    }
    tracing::info!(endpoint = %endpoint.name, %file, "configured");
    Ok(Some(file))
}
