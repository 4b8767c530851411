/// FLOP counts of one training step (forward + backward with `dX`) on each compute path,
/// from the table in docs/design.md; `auto` takes the cheapest for the shape and batch.
///
/// With `A = P L_r` (`m × r`), `h = x U_rᵀ`, `g = dY A` (both `B × r`):
/// - factored: `4Bmn + 4Br(m + n)`, plus `2Bnr` when `h` is not kept from the forward;
/// - merged (y, dX through `W_eff`; dz from `h`, `g`): `2mnr + 4Bmn + 2Br(m + n)`;
/// - merged, dz through the weight gradient `G = dYᵀx`: `2mnr + 4Bmn + 2Bmn + 2mnr`.
/// When the caller keeps `h` (forward writes it for backward), forward computes `h` on every
/// path, so keeping it pays off only on the factored path.
/// The floor is the bare frozen layer, `4Bmn`.
struct CostModel: Sendable {
    let m: Double, n: Double, r: Double, batch: Double

    init(m: Int, n: Int, rank: Int, batch: Int) {
        self.m = Double(m); self.n = Double(n); self.r = Double(rank); self.batch = Double(batch)
    }

    /// `x Wᵀ` and `dY W`: the floor of a training step.
    var bareStep: Double { 4 * batch * m * n }
    /// Building `W_eff = W + A diag(c) U_r` once.
    var rebuild: Double { 2 * m * n * r }
    /// `h = x U_rᵀ`.
    var project: Double { 2 * batch * n * r }
    /// `g = dY A`.
    var gather: Double { 2 * batch * m * r }
    /// `dz` from a weight gradient: `G = dYᵀ x` and `diag(Aᵀ G U_rᵀ)`.
    var weightGradient: Double { 2 * batch * m * n + 2 * m * n * r }

    func step(_ path: ComputePath, keepsH: Bool) -> Double {
        switch path {
        case .factored, .auto:
            return bareStep + 2 * (project + gather) + (keepsH ? 0 : project)
        case .merged:
            return rebuild + bareStep + project + gather
        case .mergedWeightGrad:
            // dz needs no h; an h the caller asked to keep is computed for nothing.
            return rebuild + bareStep + weightGradient + (keepsH ? project : 0)
        }
    }

    /// The cheapest path for a training step; ties go to the factored path (no `m × n` cache).
    func cheapest(keepsH: Bool) -> ComputePath {
        var best = ComputePath.factored
        for path in [ComputePath.merged, .mergedWeightGrad] where step(path, keepsH: keepsH) < step(best, keepsH: keepsH) {
            best = path
        }
        return best
    }

    /// The step's FLOP lower bound as a multiple of the bare layer.
    func lowerBoundRatio(keepsH: Bool) -> Double {
        step(cheapest(keepsH: keepsH), keepsH: keepsH) / bareStep
    }
}
