//! From a native measurement to the allocation problem: one item per linear (optionally tied
//! in fused groups by shared input), or one item per module with its joint rows as options.
//! Item order follows the file (`linears` / `modules`), so a solution's option index per item
//! maps straight back to the records.
use super::error::{MeasurementError, Result};
use super::native::NativeMeasurement;
use crate::alloc::{Item, Opt, Problem};
use std::collections::BTreeMap;

/// What an option's `error` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ErrorScale {
    /// tr(ΔW H ΔWᵀ) as measured: comparable across linears in absolute output-error units.
    #[default]
    Raw,
    /// tr(ΔW H ΔWᵀ) / tr(W H Wᵀ): the share of the linear's output energy lost.
    Relative,
    /// sensitivity · tr(ΔW H ΔWᵀ): the (empirical-Fisher) estimate of the loss the error adds;
    /// needs every linear's `sensitivity`.
    Fisher,
    /// [`ErrorScale::Fisher`] when every linear has a sensitivity, else
    /// [`ErrorScale::Relative`] (files measured before sensitivities existed).
    Auto,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LinearProblemOptions {
    pub scale: ErrorScale,
    /// Tie linears with the same `shared_input` (q/k/v, gate/up) to one config.
    pub fuse_shared_inputs: bool,
}

fn item(name: &str, numel: u64, options: Vec<Opt>) -> Item {
    Item {
        name: name.to_string(),
        numel,
        options,
        weight: 1.0,
        min_bpw: None,
        max_bpw: None,
        pinned: None,
        excluded: Vec::new(),
    }
}

impl NativeMeasurement {
    /// One item per linear with `config` = the config index, so fused members tie on it.
    pub fn linear_problem(&self, opts: LinearProblemOptions) -> Result<Problem> {
        let scale = self.resolve_scale(opts.scale);
        let mut items = Vec::with_capacity(self.linears.len());
        for l in &self.linears {
            let mut options = Vec::with_capacity(l.options.len());
            for o in &l.options {
                let error = match scale {
                    ErrorScale::Raw => o.err,
                    ErrorScale::Fisher | ErrorScale::Auto => match l.sensitivity {
                        Some(s) => s * o.err,
                        None => {
                            return Err(MeasurementError::Convert {
                                context: format!("linear {:?}", l.name),
                                message: "no sensitivity in this measurement (measured before \
                                          exl2rs recorded them), so the Fisher scale is \
                                          undefined; re-measure, or use the relative or raw \
                                          error scale"
                                    .into(),
                            })
                        }
                    },
                    ErrorScale::Relative if l.ref_energy > 0.0 => o.err / l.ref_energy,
                    ErrorScale::Relative => {
                        return Err(MeasurementError::Convert {
                            context: format!("linear {:?}", l.name),
                            message: "ref_energy is 0 (an all-zero weight or no calibration signal), so its relative error is undefined; use the raw error scale".into(),
                        })
                    }
                };
                options.push(Opt {
                    bits: o.bits,
                    error,
                    config: o.config,
                });
            }
            items.push(item(&l.name, l.numel(), options));
        }
        let groups = if opts.fuse_shared_inputs {
            self.fused_groups()?
        } else {
            Vec::new()
        };
        Ok(Problem { items, groups })
    }

    /// Whether every linear carries a sensitivity (the Fisher scale is available).
    pub fn has_sensitivities(&self) -> bool {
        !self.linears.is_empty() && self.linears.iter().all(|l| l.sensitivity.is_some())
    }

    /// `Auto` resolved for this file; other scales as given.
    pub fn resolve_scale(&self, scale: ErrorScale) -> ErrorScale {
        match scale {
            ErrorScale::Auto if self.has_sensitivities() => ErrorScale::Fisher,
            ErrorScale::Auto => ErrorScale::Relative,
            other => other,
        }
    }

    /// Linear indices grouped by `shared_input`, groups of two or more only, in file order.
    /// Members must have been measured with exactly the same configs, or tying is impossible.
    pub fn fused_groups(&self) -> Result<Vec<Vec<usize>>> {
        let mut by_input: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (i, l) in self.linears.iter().enumerate() {
            if let Some(s) = &l.shared_input {
                by_input.entry(s.as_str()).or_default().push(i);
            }
        }
        let mut groups: Vec<Vec<usize>> = by_input.into_values().filter(|g| g.len() > 1).collect();
        groups.sort_by_key(|g| g[0]);
        for g in &groups {
            let first = &self.linears[g[0]];
            let group = first.shared_input.clone().unwrap_or_default();
            let configs_of = |i: usize| -> Vec<u32> {
                let mut c: Vec<u32> = self.linears[i].options.iter().map(|o| o.config).collect();
                c.sort_unstable();
                c
            };
            let reference = configs_of(g[0]);
            for &m in &g[1..] {
                let mine = configs_of(m);
                if let Some(&c) = reference.iter().find(|c| !mine.contains(c)) {
                    return Err(MeasurementError::FusedMismatch {
                        group,
                        member: self.linears[m].name.clone(),
                        other: first.name.clone(),
                        config: c,
                    });
                }
                if let Some(&c) = mine.iter().find(|c| !reference.contains(c)) {
                    return Err(MeasurementError::FusedMismatch {
                        group,
                        member: first.name.clone(),
                        other: self.linears[m].name.clone(),
                        config: c,
                    });
                }
            }
        }
        Ok(groups)
    }

    /// One item per module with its joint rows as options: `error` = 1 − accuracy (as
    /// exllamav2's optimizer scores them), `config` = the row index, `numel` = the weights of
    /// the module's linears.
    pub fn module_problem(&self) -> Result<Problem> {
        let mut items = Vec::with_capacity(self.modules.len());
        for m in &self.modules {
            let mut numel = 0u64;
            for kind in m
                .rows
                .first()
                .map(|r| r.configs.keys())
                .into_iter()
                .flatten()
            {
                let name = m.linear_name(kind);
                let idx = self
                    .linear_index(&name)
                    .ok_or_else(|| MeasurementError::Convert {
                        context: format!("module {:?}", m.name),
                        message: format!("its rows name linear {name:?}, which is not in linears"),
                    })?;
                numel += self.linears[idx].numel();
            }
            let options = m
                .rows
                .iter()
                .enumerate()
                .map(|(r, row)| Opt {
                    bits: row.total_bits,
                    error: 1.0 - row.accuracy,
                    config: r as u32,
                })
                .collect();
            items.push(item(&m.name, numel, options));
        }
        Ok(Problem {
            items,
            groups: Vec::new(),
        })
    }
}
