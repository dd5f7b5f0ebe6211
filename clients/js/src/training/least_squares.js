"use strict";
/**
 * Local update of a linear model by full-batch gradient descent on the mean squared error — the same
 * model and loss as fedcore's NumpyModel(task="linear") with one output, written in plain JavaScript.
 *
 * With X (n × d), y (n), weights W = coef (d × 1) and b = intercept (1):
 *   ŷ = X W + b,   L = 1/n · Σ (ŷ − y)²,   G = 2 (ŷ − y) / n,   ∂L/∂W = Xᵀ G,   ∂L/∂b = Σ G
 * and each of the K steps, with learning rate η and (for Scaffold) the correction δ = c_i − c:
 *   W ← W − η (∂L/∂W − δ_W),   b ← b − η (∂L/∂b − δ_b)        (δ = 0 for FedAvg)
 * Losses are the L of each step before its update. Everything is computed in float64.
 */

/**
 * @param {{X: Float64Array, y: Float64Array, n: number, d: number}} data row-major features and targets
 * @param {{coef: ArrayLike<number>, intercept: ArrayLike<number>}} start W (d values) and b (1 value)
 * @param {{lr: number, steps: number, correction?: {coef?: ArrayLike<number>, intercept?: ArrayLike<number>},
 *          onStep?: (step: number, loss: number) => void}} options
 * @returns {{coef: Float64Array, intercept: Float64Array, losses: number[]}}
 */
function leastSquaresGD(data, start, { lr, steps, correction = null, onStep = null }) {
  const { X, y, n, d } = data;
  const W = Float64Array.from(start.coef);
  const b = Float64Array.from(start.intercept);
  const dW = correction && correction.coef ? Float64Array.from(correction.coef) : new Float64Array(d);
  const db = correction && correction.intercept ? correction.intercept[0] : 0;
  const G = new Float64Array(n);
  const gradW = new Float64Array(d);
  const losses = [];
  for (let step = 1; step <= steps; step++) {
    let loss = 0;
    let gradB = 0;
    for (let i = 0; i < n; i++) {
      let yhat = b[0];
      for (let j = 0; j < d; j++) yhat += X[i * d + j] * W[j];
      const diff = yhat - y[i];
      loss += diff * diff;
      G[i] = (2 * diff) / n;
      gradB += G[i];
    }
    loss /= n;
    gradW.fill(0);
    for (let i = 0; i < n; i++) {
      for (let j = 0; j < d; j++) gradW[j] += X[i * d + j] * G[i];
    }
    if (!Number.isFinite(loss)) throw new RangeError(`non-finite loss ${loss} at step ${step}; that step's update was not applied`);
    for (let j = 0; j < d; j++) W[j] -= lr * (gradW[j] - dW[j]);
    b[0] -= lr * (gradB - db);
    losses.push(loss);
    if (onStep) onStep(step, loss);
  }
  return { coef: W, intercept: b, losses };
}

/** L = 1/n · Σ (X W + b − y)² of the module docstring. */
function meanSquaredError(data, coef, intercept) {
  const { X, y, n, d } = data;
  let loss = 0;
  for (let i = 0; i < n; i++) {
    let yhat = intercept[0];
    for (let j = 0; j < d; j++) yhat += X[i * d + j] * coef[j];
    loss += (yhat - y[i]) ** 2;
  }
  return loss / n;
}

module.exports = { leastSquaresGD, meanSquaredError };
