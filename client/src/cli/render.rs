//! Text rendering helpers: tables, kernels, labels, times.

use comfy_table::{CellAlignment, ContentArrangement, Table, presets};
use filterdb_client::proto::Label;

/// A table with the given headers; `numeric` columns are right-aligned.
pub fn table(headers: &[&str], numeric: &[usize]) -> Table {
    let mut t = Table::new();
    t.load_preset(presets::UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic);
    t.set_header(headers.to_vec());
    for &i in numeric {
        if let Some(c) = t.column_mut(i) {
            c.set_cell_alignment(CellAlignment::Right);
        }
    }
    t
}

/// A table without a header row, for key/value listings.
pub fn plain_table() -> Table {
    let mut t = Table::new();
    t.load_preset(presets::UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic);
    t
}

/// A float like C's `% .4f`: a space where a minus sign would go, so columns line up.
pub fn space_f4(v: f32) -> String {
    if v.is_sign_negative() && !v.is_nan() {
        format!("{v:.4}")
    } else {
        format!(" {v:.4}")
    }
}

/// A 3x3 kernel as three indented rows.
pub fn kernel_grid(k: &[f32; 9]) -> String {
    let mut out = String::new();
    for row in k.chunks_exact(3) {
        let cells: Vec<String> = row.iter().map(|v| format!("{:>7}", space_f4(*v))).collect();
        out.push_str("  ");
        out.push_str(&cells.join(" "));
        out.push('\n');
    }
    out
}

/// The canonical value of a label, or empty.
pub fn canonical(l: Option<&Label>) -> String {
    l.map(|l| l.canonical.clone()).unwrap_or_default()
}

/// Canonical values of a label list, comma-joined.
pub fn canonical_list(ls: &[Label]) -> String {
    ls.iter()
        .map(|l| l.canonical.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Unix milliseconds as `YYYY-MM-DD HH:MM:SS UTC` (no date crate needed for one format).
pub fn utc_time(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_formatting() {
        assert_eq!(space_f4(0.5), " 0.5000");
        assert_eq!(space_f4(-0.12345), "-0.1235");
        assert_eq!(space_f4(-0.0), "-0.0000");
        let g = kernel_grid(&[1.0, -2.0, 0.25, 0.0, 0.0, 0.0, -1.5, 10.0, 0.1]);
        let lines: Vec<&str> = g.lines().collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0], "   1.0000 -2.0000  0.2500");
        assert_eq!(lines[2], "  -1.5000  10.0000  0.1000");
    }

    #[test]
    fn times() {
        assert_eq!(utc_time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc_time(1_764_122_953_000), "2025-11-26 02:09:13 UTC");
        assert_eq!(utc_time(951_782_400_000), "2000-02-29 00:00:00 UTC");
    }

    #[test]
    fn tables_render() {
        let mut t = table(&["id", "name"], &[0]);
        t.add_row(vec!["1", "a"]);
        let s = t.to_string();
        assert!(s.contains("id") && s.contains(" a "), "{s}");
    }
}
