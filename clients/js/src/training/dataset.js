"use strict";
/**
 * A small local tabular dataset for the linear model: CSV (header row, comma-separated numbers) or JSON
 * (an array of records `[{"x1": 0.5, "x2": 1, "y": 2.5}, ...]`). Features are every column except the
 * target, in file order, unless `features` names them. Rows are held as one Float64Array, row-major.
 */
const fs = require("node:fs");
const path = require("node:path");
const { ConfigError } = require("../errors.js");

function parseCsv(text, file) {
  const lines = text.split(/\r?\n/).filter((l) => l.trim() !== "");
  if (lines.length === 0) throw new ConfigError(`${file}: empty CSV file`);
  const columns = lines[0].split(",").map((c) => c.trim());
  const rows = lines.slice(1).map((line, i) => {
    const cells = line.split(",");
    if (cells.length !== columns.length) {
      throw new ConfigError(`${file}: line ${i + 2} has ${cells.length} fields, the header has ${columns.length}`);
    }
    return cells.map((c, j) => {
      const v = c.trim() === "" ? NaN : Number(c);
      if (!Number.isFinite(v)) throw new ConfigError(`${file}: line ${i + 2}, column ${columns[j]}: ${JSON.stringify(c)} is not a finite number`);
      return v;
    });
  });
  return { columns, rows };
}

function parseJson(text, file) {
  let records;
  try {
    records = JSON.parse(text);
  } catch (err) {
    throw new ConfigError(`${file}: not valid JSON (${err.message})`);
  }
  if (!Array.isArray(records) || records.length === 0 || records.some((r) => r === null || typeof r !== "object" || Array.isArray(r))) {
    throw new ConfigError(`${file}: expected a non-empty JSON array of records like {"x1": 0.5, "y": 2}`);
  }
  const columns = Object.keys(records[0]);
  const rows = records.map((r, i) => columns.map((c) => {
    const v = r[c];
    if (typeof v !== "number" || !Number.isFinite(v)) throw new ConfigError(`${file}: record ${i}, key ${c}: ${JSON.stringify(v)} is not a finite number`);
    return v;
  }));
  return { columns, rows };
}

/**
 * Load `file` (.csv or .json) with `target` as y.
 * @returns {{name: string, format: string, X: Float64Array, y: Float64Array, n: number, d: number,
 *            features: string[], target: string}}
 */
function loadDataset(file, target, { features = null } = {}) {
  if (!fs.existsSync(file)) throw new ConfigError(`dataset file ${file} does not exist`);
  const ext = path.extname(file).toLowerCase();
  const text = fs.readFileSync(file, "utf8");
  let parsed;
  if (ext === ".csv") parsed = parseCsv(text, file);
  else if (ext === ".json") parsed = parseJson(text, file);
  else throw new ConfigError(`dataset ${file}: unknown format ${JSON.stringify(ext)}; use .csv or .json`);
  const { columns, rows } = parsed;
  const yIndex = columns.indexOf(target);
  if (yIndex < 0) throw new ConfigError(`${file}: no target column ${JSON.stringify(target)}; columns: ${columns.join(", ")}`);
  const names = features || columns.filter((c) => c !== target);
  const xIndex = names.map((f) => {
    const j = columns.indexOf(f);
    if (j < 0 || f === target) throw new ConfigError(`${file}: no feature column ${JSON.stringify(f)}; columns: ${columns.join(", ")}`);
    return j;
  });
  if (rows.length === 0) throw new ConfigError(`${file}: no data rows`);
  if (xIndex.length === 0) throw new ConfigError(`${file}: no feature columns besides the target`);
  const n = rows.length;
  const d = xIndex.length;
  const X = new Float64Array(n * d);
  const y = new Float64Array(n);
  rows.forEach((row, i) => {
    xIndex.forEach((j, k) => { X[i * d + k] = row[j]; });
    y[i] = row[yIndex];
  });
  return { name: path.basename(file, ext), format: ext.slice(1), X, y, n, d, features: names, target };
}

module.exports = { loadDataset };
