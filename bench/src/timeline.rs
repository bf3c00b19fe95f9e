//! The timeline diagram of docs/rotation.md, drawn from the planner itself: a scripted rotation
//! runs through the simulated world of the planner's property tests (the same executor, the same
//! `plan::record` bookkeeping as the controller), each key's phase is sampled every minute, and the
//! result is rendered as SVG (docs/rotation-timeline.svg, by `svg::render_timelines`) and as a
//! Mermaid gantt chart (in docs/rotation.md).
//!
//! `cargo run -p bench -- --timeline` (or `make timeline`) rewrites both; the test below fails when
//! they no longer match what the planner does.

use std::path::Path;

use iam_key_operator::{
    crd::{KeyPhase, KeyStatus},
    plan::{
        Step,
        simulation::{Event, History, Outcome, RotationChoice, START, Sim},
    },
};
use jiff::Timestamp;

use crate::svg::{self, BarStyle, hhmm};

/// What a key is doing, as the diagram shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lane {
    Current,
    Grace,
    InUse,
    Window,
}

impl Lane {
    fn style(self) -> BarStyle {
        let (long, short, fill, ink) = match self {
            Lane::Current => ("Current · Active · in the Secret", "Current", "#2e7d32", "#ffffff"),
            Lane::Grace => ("Draining · Active (gracePeriod)", "grace", "#f9a825", "#212121"),
            Lane::InUse => ("Draining · still used (waitForUnused)", "still used", "#e65100", "#ffffff"),
            Lane::Window => ("Inactive · rollback window (retainInactive)", "Inactive", "#b0bec5", "#212121"),
        };
        BarStyle { fill, ink, long, short }
    }

    /// The Mermaid task tag.
    fn mermaid_tag(self) -> &'static str {
        match self {
            Lane::Current => "",
            Lane::Grace => "active, ",
            Lane::InUse => "crit, ",
            Lane::Window => "done, ",
        }
    }
}

/// One key's bar: `(from, to, lane)` in minutes.
type Segments = Vec<(i64, i64, Lane)>;

/// A scripted rotation, sampled.
struct Rotation {
    title: &'static str,
    /// Minutes since the first key was created.
    requested_at: i64,
    view: (i64, i64),
    /// The old key, then the new one: `(from, to, lane)`; a key absent after its last
    /// segment was deleted.
    keys: Vec<(&'static str, Segments)>,
    deleted_at: Vec<Option<i64>>,
    /// Operator steps worth a marker: `(minute, label)`.
    marks: Vec<(i64, String)>,
}

const REQUESTED_AT_MIN: i64 = 60;
const VIEW_MIN: (i64, i64) = (45, 165);

fn scripted_rotation(wait_for_unused: bool) -> Rotation {
    let h = History {
        key_status: KeyStatus::Active,
        // gracePeriod 10m, retainInactive 1h (usageCheckInterval 5m, maxWait 1h).
        rotation: Some(RotationChoice { interval: 0, grace: 2, retain: 2, wait_for_unused }),
        restart_targets: !wait_for_unused,
        policy: (0, 0, false),
        seed: 0,
        events: vec![],
    };
    let mut sim = Sim::new(&h);
    let at = |m: i64| Timestamp::from_second(START + m * 60).unwrap();
    let minute = |t: Timestamp| (t.as_second() - START + 59).div_euclid(60);
    // The client without restart targets picks the new key up only when its pod restarts.
    let client_restarts_at = REQUESTED_AT_MIN + 25;
    let mut samples: Vec<Vec<Option<Lane>>> = vec![];
    let mut next_wake = 0;
    for m in 0..=VIEW_MIN.1 {
        sim.now = at(m);
        if m == REQUESTED_AT_MIN {
            sim.apply(Event::RequestRotation);
            next_wake = m; // the annotation change is watched: reconcile now
        }
        if m == client_restarts_at {
            sim.apply(Event::ClientReloadsSecret);
        }
        sim.client_uses_its_key();
        if m >= next_wake {
            match sim.reconcile() {
                Outcome::Done(Some(wake)) => next_wake = minute(wake),
                _ => panic!("the scripted rotation must converge:\n{}", sim.trace.join("\n")),
            }
        }
        if m == 0 {
            sim.apply(Event::ClientReloadsSecret);
        }
        let lanes = ["K1", "K2"].map(|id| {
            sim.status.keys.iter().find(|k| k.access_key_id == id).map(|k| match k.phase {
                KeyPhase::Current => Lane::Current,
                KeyPhase::Draining if k.deactivate_at.as_ref().is_some_and(|t| t.0 > sim.now) => Lane::Grace,
                KeyPhase::Draining => Lane::InUse,
                KeyPhase::Inactive => Lane::Window,
            })
        });
        samples.push(lanes.to_vec());
    }
    assert!(sim.violations.is_empty(), "{}", sim.violations.join("\n"));
    let mut keys = vec![];
    let mut deleted_at = vec![];
    for (i, name) in ["old key", "new key"].into_iter().enumerate() {
        let mut segments: Segments = vec![];
        let mut seen_last = None;
        for (m, lanes) in samples.iter().enumerate() {
            let m = m as i64;
            let Some(lane) = lanes[i] else { continue };
            seen_last = Some(m);
            match segments.last_mut() {
                Some(s) if s.2 == lane && s.1 == m => s.1 = m + 1,
                _ => segments.push((m, m + 1, lane)),
            }
        }
        deleted_at.push(seen_last.filter(|m| *m < VIEW_MIN.1).map(|m| m + 1));
        keys.push((name, segments));
    }
    let mut marks = vec![(REQUESTED_AT_MIN, "rotation requested".to_owned())];
    let mut checks = 0;
    for (t, step) in &sim.executed {
        let m = minute(*t);
        if m < REQUESTED_AT_MIN {
            continue;
        }
        let label = match step {
            Step::CreateKey { .. } => "create · tag · verify (STS) · publish".to_owned(),
            Step::RestartTargets { .. } => "restart targets".to_owned(),
            Step::CheckKeyUsage { .. } => {
                checks += 1;
                if checks == 1 { "usage checks".to_owned() } else { String::new() }
            }
            Step::RetireKey { .. } => "deactivate old key".to_owned(),
            Step::DeleteRetired { .. } => "delete old key".to_owned(),
            _ => continue,
        };
        marks.push((m, label));
    }
    Rotation {
        title: if wait_for_unused {
            "waitForUnused: true — a client keeps using the old key until its pod restarts 25m later"
        } else {
            "Rotation requested (gracePeriod: 10m, retainInactive: 1h, restartTargets set)"
        },
        requested_at: REQUESTED_AT_MIN,
        view: VIEW_MIN,
        keys,
        deleted_at,
        marks,
    }
}

fn render_svg(rotations: &[Rotation]) -> String {
    let timelines: Vec<svg::Timeline> = rotations
        .iter()
        .map(|r| svg::Timeline {
            title: r.title.to_owned(),
            view: r.view,
            rows: r
                .keys
                .iter()
                .zip(&r.deleted_at)
                .map(|((name, segments), deleted_at)| svg::Row {
                    label: (*name).to_owned(),
                    bars: segments.iter().map(|&(from, to, lane)| (from, to, lane.style())).collect(),
                    deleted_at: *deleted_at,
                })
                .collect(),
            marks: r.marks.clone(),
        })
        .collect();
    let legend = [
        (Lane::Current.style(), "Current: Active in IAM, in the Secret"),
        (Lane::Grace.style(), "Draining: still Active (gracePeriod)"),
        (Lane::InUse.style(), "Draining: held Active while IAM shows use"),
        (Lane::Window.style(), "Inactive in IAM: rollback window"),
    ];
    let footnote = "Each bar is what the planner did, minute by minute, in a simulated run (src/plan/simulation/); \
                    the dashed lines are the steps it executed.";
    svg::render_timelines(&timelines, &legend, footnote, "bench/src/timeline.rs (cargo run -p bench -- --timeline)")
}

fn render_mermaid(timelines: &[Rotation]) -> String {
    let mut out = String::new();
    for (n, tl) in timelines.iter().enumerate() {
        out.push_str("```mermaid\ngantt\n");
        out.push_str(&format!("    title {}\n", tl.title.replace([':', '#', ';'], "")));
        out.push_str("    dateFormat HH:mm\n    axisFormat %H:%M\n");
        for (i, (name, segments)) in tl.keys.iter().enumerate() {
            out.push_str(&format!("    section {name}\n"));
            for (j, &(from, to, lane)) in segments.iter().enumerate() {
                let (long, tag) = (lane.style().long, lane.mermaid_tag());
                let to = to.min(tl.view.1);
                out.push_str(&format!("    {long} :{tag}t{n}k{i}s{j}, {}, {}\n", hhmm(from), hhmm(to)));
            }
        }
        out.push_str("    section operator\n");
        let mut merged: Vec<(i64, String)> = vec![];
        for (m, label) in tl.marks.iter().filter(|(_, l)| !l.is_empty()) {
            match merged.last_mut() {
                Some((at, text)) if at == m => *text = format!("{text} → {label}"),
                _ => merged.push((*m, label.clone())),
            }
        }
        for (j, (m, label)) in merged.iter().enumerate() {
            out.push_str(&format!("    {label} :milestone, t{n}m{j}, {}, 0m\n", hhmm(*m)));
        }
        out.push_str("```\n");
        if n + 1 < timelines.len() {
            out.push('\n');
        }
    }
    out
}

const MERMAID_BEGIN: &str = "<!-- BEGIN generated timeline: bench/src/timeline.rs, `make timeline` to refresh -->\n";
const MERMAID_END: &str = "<!-- END generated timeline -->";

/// The two scripted rotations, checked against what the diagram claims (so that a change of
/// behaviour shows up as a failure), rendered: the SVG and the Mermaid chart.
fn render() -> (String, String) {
    let timelines = [scripted_rotation(false), scripted_rotation(true)];
    let plain = &timelines[0];
    assert_eq!(plain.keys[0].1.iter().map(|s| s.2).collect::<Vec<_>>(), [Lane::Current, Lane::Grace, Lane::Window]);
    assert_eq!(plain.deleted_at[0], Some(REQUESTED_AT_MIN + 10 + 60), "grace 10m, then 1h rollback window");
    let careful = &timelines[1];
    let old: Vec<Lane> = careful.keys[0].1.iter().map(|s| s.2).collect();
    assert_eq!(old, [Lane::Current, Lane::Grace, Lane::InUse, Lane::Window]);
    assert!(timelines.iter().all(|t| t.requested_at == REQUESTED_AT_MIN));
    (render_svg(&timelines), render_mermaid(&timelines))
}

/// docs/rotation.md with `mermaid` between the markers.
fn with_mermaid(md: &str, mermaid: &str) -> String {
    let begin =
        md.find(MERMAID_BEGIN).expect("docs/rotation.md lacks the generated-timeline markers") + MERMAID_BEGIN.len();
    let end = md[begin..].find(MERMAID_END).expect("end marker") + begin;
    format!("{}{mermaid}{}", &md[..begin], &md[end..])
}

/// Rewrite docs/rotation-timeline.svg and the Mermaid timeline in docs/rotation.md.
pub fn write_docs(root: &Path) {
    let (svg, mermaid) = render();
    let docs = root.join("docs");
    let md_path = docs.join("rotation.md");
    let md = std::fs::read_to_string(&md_path).expect("docs/rotation.md");
    std::fs::write(docs.join("rotation-timeline.svg"), svg).expect("write docs/rotation-timeline.svg");
    std::fs::write(&md_path, with_mermaid(&md, &mermaid)).expect("write docs/rotation.md");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_timeline_in_the_docs_matches_the_planner() {
        let root = testenv::repo_root();
        let docs = root.join("docs");
        if std::env::var_os("IKO_UPDATE_DOCS").is_some() {
            return write_docs(&root);
        }
        let (svg, mermaid) = render();
        let stale = "is stale: run `make timeline` (cargo run -p bench -- --timeline)";
        let on_disk = std::fs::read_to_string(docs.join("rotation-timeline.svg")).unwrap_or_default();
        assert!(on_disk == svg, "docs/rotation-timeline.svg {stale}");
        let md = std::fs::read_to_string(docs.join("rotation.md")).expect("docs/rotation.md");
        assert!(with_mermaid(&md, &mermaid) == md, "the Mermaid timeline in docs/rotation.md {stale}");
    }
}
