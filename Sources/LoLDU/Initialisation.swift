/// The initial trainable diagonal `z₀` for `init`, from the pivots `D_r`, in `Double`.
///
/// `constant`, `uniform` and `normal` use `μ = mean(D_r)` and the sample standard deviation
/// `s = std(D_r)` (divisor `r − 1`, as `torch.std`; `0` when `r = 1`). Random inits draw from
/// ``Xoshiro256`` seeded with `seed`, so they are bit-identical on every machine and binding,
/// and the same seed gives the same `z₀` in `float` and `double` (up to the final rounding).
func initialDiagonal(_ zInit: ZInit, pivots d: [Double], seed: UInt64) -> [Double] {
    let r = d.count
    let mean = d.reduce(0, +) / Double(r)
    var rng = Xoshiro256(seed: seed)
    switch zInit {
    case .lu:
        return d
    case .constant:
        return Array(repeating: mean, count: r)
    case .uniform:
        let half = abs(mean) / 2
        return (0..<r).map { _ in -half + 2 * half * rng.uniform() }
    case .normal:
        let variance = r > 1 ? d.reduce(0) { $0 + ($1 - mean) * ($1 - mean) } / Double(r - 1) : 0
        let std = variance.squareRoot()
        return (0..<r).map { _ in mean + std * rng.normal() }
    case .sUniform:
        return (0..<r).map { _ in -1 + 2 * rng.uniform() }
    case .sNormal:
        return (0..<r).map { _ in rng.normal() }
    case .ones:
        return Array(repeating: 1, count: r)
    case .zeros:
        return Array(repeating: 0, count: r)
    }
}
