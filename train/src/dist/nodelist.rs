//! Slurm's compressed host lists (`SLURM_JOB_NODELIST`): `gpu[01-03,07],cpu5` is gpu01, gpu02,
//! gpu03, gpu07, cpu5. A name may hold several bracket groups (`rack[1-2]-n[01-02]`: every
//! combination, the last group varying fastest, as `scontrol show hostnames` prints them);
//! a range keeps the zero padding of its first bound.

use anyhow::{bail, Result};

/// Every host of a compressed list, in order.
pub fn expand(list: &str) -> Result<Vec<String>> {
    let mut hosts = Vec::new();
    for item in split_top(list)? {
        if item.is_empty() {
            continue;
        }
        hosts.extend(expand_one(&item).map_err(|e| anyhow::anyhow!("host list `{list}`: {e}"))?);
    }
    if hosts.is_empty() {
        bail!("host list `{list}` names no host");
    }
    Ok(hosts)
}

/// The first host of a compressed list (where rank 0 of a Slurm job step runs).
pub fn first_host(list: &str) -> Result<String> {
    Ok(expand(list)?.swap_remove(0))
}

/// Split at the commas outside brackets.
fn split_top(list: &str) -> Result<Vec<String>> {
    let (mut items, mut cur, mut depth) = (Vec::new(), String::new(), 0i32);
    for c in list.trim().chars() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            ',' if depth == 0 => {
                items.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        if !(0..=1).contains(&depth) {
            bail!("host list `{list}`: unbalanced or nested brackets");
        }
        cur.push(c);
    }
    if depth != 0 {
        bail!("host list `{list}`: unbalanced brackets");
    }
    items.push(cur);
    Ok(items.into_iter().map(|s| s.trim().to_string()).collect())
}

/// One name with zero or more bracket groups.
fn expand_one(name: &str) -> Result<Vec<String>> {
    let Some(open) = name.find('[') else {
        return Ok(vec![name.to_string()]);
    };
    let close = open + name[open..].find(']').ok_or_else(|| anyhow::anyhow!("`{name}`: no closing bracket"))?;
    let (prefix, group, rest) = (&name[..open], &name[open + 1..close], &name[close + 1..]);
    let tails = expand_one(rest)?;
    let mut out = Vec::new();
    for part in group.split(',') {
        let part = part.trim();
        let (lo, hi) = part.split_once('-').unwrap_or((part, part));
        let (a, b) = match (lo.parse::<u64>(), hi.parse::<u64>()) {
            (Ok(a), Ok(b)) if a <= b && !lo.is_empty() => (a, b),
            _ => bail!("`{name}`: `{part}` is not a number or a range a-b"),
        };
        if b - a > 100_000 {
            bail!("`{name}`: range `{part}` is too large");
        }
        for n in a..=b {
            let host = format!("{prefix}{n:0width$}", width = lo.len());
            out.extend(tails.iter().map(|t| format!("{host}{t}")));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressed_forms() {
        assert_eq!(expand("gpu[01-03,07],cpu5").unwrap(), ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]);
        assert_eq!(first_host("gpu[01-03,07],cpu5").unwrap(), "gpu01");
        assert_eq!(expand("node1").unwrap(), ["node1"]);
        assert_eq!(expand("a,b , c").unwrap(), ["a", "b", "c"]);
        assert_eq!(expand("n[8-11]").unwrap(), ["n8", "n9", "n10", "n11"]);
        assert_eq!(expand("n[098-100]").unwrap(), ["n098", "n099", "n100"]);
        assert_eq!(expand("x[1-2]-ib").unwrap(), ["x1-ib", "x2-ib"]);
        assert_eq!(expand("r[1-2]-n[01,03]").unwrap(), ["r1-n01", "r1-n03", "r2-n01", "r2-n03"]);
        assert_eq!(first_host("dgx-[004-007],login").unwrap(), "dgx-004");
        assert_eq!(expand("h[5]").unwrap(), ["h5"]);
    }

    #[test]
    fn malformed_lists_are_errors() {
        for bad in ["", "gpu[01-03", "gpu01-03]", "gpu[a-b]", "gpu[3-1]", "gpu[[1]]", "gpu[]"] {
            assert!(expand(bad).is_err(), "{bad}");
        }
    }
}
