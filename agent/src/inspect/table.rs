//! Aligned text tables for people (`-o table`): a header row, columns as wide as their
//! widest cell, two spaces between columns, no trailing spaces. Cells are plain strings;
//! a column whose header ends in `#` or that holds numbers only is right-aligned.
use std::fmt::Write as _;

/// A table being built row by row.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Self {
        Self { header: header.iter().map(|h| h.to_string()).collect(), rows: Vec::new() }
    }

    /// Adds a row; missing cells are empty, extra cells are an error of the caller and
    /// are dropped.
    pub fn row(&mut self, cells: Vec<String>) {
        let mut cells = cells;
        cells.resize(self.header.len(), String::new());
        self.rows.push(cells);
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// The table as text, one line per row after the header, each ending in `\n`.
    pub fn render(&self) -> String {
        let n = self.header.len();
        let width = |i: usize| {
            self.rows
                .iter()
                .map(|r| r[i].chars().count())
                .chain([self.header[i].chars().count()])
                .max()
                .unwrap_or(0)
        };
        let widths: Vec<usize> = (0..n).map(width).collect();
        let numeric: Vec<bool> = (0..n)
            .map(|i| {
                !self.rows.is_empty()
                    && self.rows.iter().all(|r| {
                        let c = r[i].as_str();
                        c.is_empty() || c == "-" || c.parse::<f64>().is_ok()
                    })
            })
            .collect();
        let mut out = String::new();
        for cells in std::iter::once(&self.header).chain(&self.rows) {
            let mut line = String::new();
            for (i, cell) in cells.iter().enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                let pad = widths[i] - cell.chars().count();
                if numeric[i] {
                    let _ = write!(line, "{}{cell}", " ".repeat(pad));
                } else {
                    let _ = write!(line, "{cell}{}", " ".repeat(pad));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_and_numbers_go_right() {
        let mut t = Table::new(&["NAME", "COUNT", "WHERE"]);
        t.row(vec!["a".into(), "5".into(), "10.0.0.1:80".into()]);
        t.row(vec!["longer-name".into(), "12345".into()]);
        assert_eq!(
            t.render(),
            "NAME         COUNT  WHERE\n\
             a                5  10.0.0.1:80\n\
             longer-name  12345\n"
        );
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn an_empty_table_is_its_header() {
        let t = Table::new(&["A", "B"]);
        assert!(t.is_empty());
        assert_eq!(t.render(), "A  B\n");
    }

    #[test]
    fn width_counts_characters_not_bytes() {
        let mut t = Table::new(&["X", "Y"]);
        t.row(vec!["→ é".into(), "y".into()]);
        t.row(vec!["abc".into(), "z".into()]);
        assert_eq!(t.render(), "X    Y\n→ é  y\nabc  z\n");
    }
}
