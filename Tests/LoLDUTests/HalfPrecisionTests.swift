import CLoLDU
import Glibc
import Testing

/// bfloat16 and float16 adapters against float32 adapters on the same (half-precision) values.
///
/// Widened (float16 always; bfloat16 on CPUs without bf16 units, or forced): the library widens
/// exactly and runs the float32 computation, so every output is the float32 result rounded once
/// to the half type, and parameters and gradients are the float32 ones, bit for bit.
/// Native bf16 (oneDNN on bf16 units): the products of bf16 values are exact and accumulate in
/// float32, but U_r, A and the per-row (h ⊙ c) are rounded to bf16 once (relative error at most
/// u = 2⁻⁸ each) and the output once more. With H = |x| |U|ᵀ (what bounds h's rounding error) and
/// Γ = |dY| |A| (g's), per element
///     |y − y₃₂|  ≤ u·|y₃₂|  + 4u·((H ⊙ |c|) |A|ᵀ) + (n + r)·2⁻²³·(|x| |W|ᵀ)
///     |dX − dX₃₂| ≤ u·|dX₃₂| + 4u·((Γ ⊙ |c|) |U|)  + (m + r)·2⁻²³·(|dY| |W|)
///     |dz_k − dz₃₂,k| ≤ 3u·σ·Σ_b H_bk Γ_bk, and |dσ − dσ₃₂| ≤ 3u·Σ_k |z_k| Σ_b H_bk Γ_bk.
/// The merged paths round A diag(c) (from float32's A) and U_r once each, and W_eff = W + A diag(c) U_r
/// once more (u·|W_eff| ≤ u·(|W| + |A| |c| |U|)): three first-order terms of the 4u above, whose
/// share of |W| gives y and dX u·(|x| |W|ᵀ) and u·(|dY| |W|) more; dz rounds the weight gradient
/// dYᵀx and A once each (two of the 3u).
/// bf16 units treat subnormal inputs (|v| < 2⁻¹²⁶) as zero: they are not used here.
@Suite(.serialized) struct HalfPrecisionTests {
    enum Half: String, CaseIterable, Sendable, CustomStringConvertible {
        case bf16, f16
        var dtype: loldu_dtype { self == .bf16 ? LOLDU_BFLOAT16 : LOLDU_FLOAT16 }
        var description: String { rawValue }
        /// Unit roundoff: 2⁻⁸ (bf16, 8 significant bits), 2⁻¹¹ (f16, 11 bits).
        var u: Double { self == .bf16 ? 0x1p-8 : 0x1p-11 }

        /// Round to nearest even, independently of the library: the two neighbours, the closer.
        func round(_ f: Float) -> UInt16 {
            switch self {
            case .f16: return Float16(f).bitPattern  // the standard library's conversion
            case .bf16:
                if f.isNaN { return 0x7FC0 }
                let down = UInt16(truncatingIfNeeded: f.bitPattern >> 16)
                let up = down &+ 1
                let (a, b) = (Double(widen(down)), Double(widen(up)))
                let x = Double(f)
                if abs(x - a) < abs(x - b) || b.isNaN { return down }
                if abs(x - a) > abs(x - b) { return up }
                return down & 1 == 0 ? down : up
            }
        }

        func widen(_ bits: UInt16) -> Float {
            switch self {
            case .f16: return Float(Float16(bitPattern: bits))
            case .bf16: return Float(bitPattern: UInt32(bits) << 16)
            }
        }
    }

    /// Half-precision values of `count` random numbers.
    static func values(_ half: Half, _ count: Int, _ random: inout TestRandom, scale: Float = 1) -> [UInt16] {
        (0..<count).map { _ in half.round(scale * Float(random.symmetric())) }
    }

    static func adapter(_ dtype: loldu_dtype, m: Int, n: Int, weight: UnsafeRawPointer, bias: UnsafeRawPointer?, rank: Int) throws -> OpaquePointer {
        var config = loldu_config()
        _ = loldu_config_default(&config)
        config.rank = Int64(rank)
        var handle: OpaquePointer?
        let status = loldu_adapter_create(&handle, dtype, Int64(m), Int64(n), weight, bias, &config)
        guard status == LOLDU_OK, let handle else { throw LibraryError(status: status, message: String(cString: loldu_last_error())) }
        return handle
    }

    static let settings: [(Half, Bool)] = [(.bf16, false), (.bf16, true), (.f16, false)]

    @Test(arguments: settings)
    func layerMatchesFloat32OnTheSameValues(_ half: Half, _ forceWidened: Bool) throws {
        #expect(loldu_set_widened_half(forceWidened ? 1 : 0) == LOLDU_OK)
        defer { _ = loldu_set_widened_half(0) }
        var random = TestRandom(half == .bf16 ? 301 : 302)
        let (m, n, r, batch) = (48, 40, 12, 24)
        let w = Self.values(half, m * n, &random), b = Self.values(half, m, &random, scale: 0.5)
        let x = Self.values(half, batch * n, &random, scale: 2), dy = Self.values(half, batch * m, &random)
        let (wf, bf, xf, dyf) = (w.map(half.widen), b.map(half.widen), x.map(half.widen), dy.map(half.widen))
        let a = try Self.adapter(half.dtype, m: m, n: n, weight: w, bias: b, rank: r)
        defer { loldu_adapter_free(a) }
        let reference = try Self.adapter(LOLDU_FLOAT32, m: m, n: n, weight: wf, bias: bf, rank: r)
        defer { loldu_adapter_free(reference) }

        let info = adapterInfo(a)
        #expect(info.dtype == Int32(half.dtype.rawValue) && info.param_dtype == Int32(LOLDU_FLOAT32.rawValue))
        var chosen = loldu_backend(rawValue: 0)
        #expect(loldu_gemm_backend(half.dtype, &chosen, nil) == LOLDU_OK)
        let native = info.backend == Int32(LOLDU_BACKEND_ONEDNN.rawValue)
        #expect(native == (half == .bf16 && !forceWidened && chosen == LOLDU_BACKEND_ONEDNN), "backend \(info.backend)")
        // Same values, same pivots, same factors (the LU runs in double on the values).
        for which in [LOLDU_FACTOR_LOWER, LOLDU_FACTOR_DIAG, LOLDU_FACTOR_UPPER] {
            let count = which == LOLDU_FACTOR_DIAG ? r : (which == LOLDU_FACTOR_LOWER ? m * r : r * n)
            var mine = [Float](repeating: .nan, count: count), theirs = mine
            #expect(loldu_get_factor(a, which, &mine) == LOLDU_OK && loldu_get_factor(reference, which, &theirs) == LOLDU_OK)
            #expect(mine == theirs, "factor \(which.rawValue)")
        }

        // A trained-looking z and σ on both.
        var z = [Float](repeating: 0, count: r)
        #expect(loldu_get_z(a, &z) == LOLDU_OK)
        z = z.enumerated().map { $0.element * (1 + 0.3 * Float(($0.offset % 5) - 2)) }
        for h in [a, reference] {
            #expect(loldu_set_z(h, z) == LOLDU_OK)
            #expect(loldu_set_sigma(h, 0.8) == LOLDU_OK)
        }
        let u = half.u
        for path in allPaths {
            for h in [a, reference] { #expect(loldu_set_path(h, path) == LOLDU_OK); #expect(loldu_zero_grad(h) == LOLDU_OK) }
            var y = [UInt16](repeating: 0, count: batch * m), yRef = [Float](repeating: .nan, count: batch * m)
            var hRef = [Float](repeating: .nan, count: batch * r)
            #expect(loldu_forward(a, Int64(batch), x, &y, nil) == LOLDU_OK, "\(String(cString: loldu_last_error()))")
            #expect(loldu_forward(reference, Int64(batch), xf, &yRef, &hRef) == LOLDU_OK)
            var dx = [UInt16](repeating: 0, count: batch * n), dxRef = [Float](repeating: .nan, count: batch * n)
            #expect(loldu_backward(a, Int64(batch), x, dy, &dx, nil) == LOLDU_OK, "\(String(cString: loldu_last_error()))")
            #expect(loldu_backward(reference, Int64(batch), xf, dyf, &dxRef, nil) == LOLDU_OK)
            let (grads, gradsRef) = (Self.grads(a, r), Self.grads(reference, r))
            let what = "\(half) \(forceWidened ? "widened" : "auto") path \(path.rawValue)"
            // W_eff as written out is float32's rounded once, whatever operands the step built its
            // cached W_eff from (bf16 ones on the merged paths on bf16 units).
            var weff = [UInt16](repeating: 0, count: m * n), weffRef = [Float](repeating: .nan, count: m * n)
            #expect(loldu_effective_weight(a, &weff) == LOLDU_OK && loldu_effective_weight(reference, &weffRef) == LOLDU_OK)
            let differing = zip(weff, weffRef).filter { $0 != half.round($1) }.count
            #expect(differing == 0, "\(what): W_eff is the float32 one rounded once; \(differing) of \(m * n) elements differ")
            if path != LOLDU_PATH_AUTO {  // (auto may change its path on repeated forwards)
                // Merges (here and in the previous path's turn) leave what a step computes as a
                // fresh clone computes it, bit for bit.
                var fresh: OpaquePointer?
                #expect(loldu_adapter_clone(&fresh, a) == LOLDU_OK && loldu_set_path(fresh, path) == LOLDU_OK)
                defer { loldu_adapter_free(fresh) }
                var again = [UInt16](repeating: 0, count: batch * m), yFresh = again
                #expect(loldu_forward(fresh, Int64(batch), x, &yFresh, nil) == LOLDU_OK)
                #expect(loldu_merge(a) == LOLDU_OK && loldu_unmerge(a) == LOLDU_OK)
                #expect(loldu_forward(a, Int64(batch), x, &again, nil) == LOLDU_OK)
                for (output, label) in [(y, "y"), (again, "y after a merge and an unmerge")] {
                    let differing = zip(output, yFresh).filter { $0 != $1 }.count
                    #expect(differing == 0, "\(what): \(label): \(differing) elements differ from a fresh clone's")
                }
            }
            if !native {
                #expect(y == yRef.map(half.round), "\(what): y is the float32 y rounded once")
                #expect(dx == dxRef.map(half.round), "\(what): dX is the float32 dX rounded once")
                #expect(grads == gradsRef, "\(what): dz, dσ are the float32 ones")
                continue
            }
            // Native bf16: the bounds in the suite's documentation, from magnitudes.
            var lower = [Float](repeating: 0, count: m * r), upper = [Float](repeating: 0, count: r * n)
            var d = [Float](repeating: 0, count: r)
            _ = loldu_get_factor(a, LOLDU_FACTOR_LOWER, &lower)
            _ = loldu_get_factor(a, LOLDU_FACTOR_UPPER, &upper)
            _ = loldu_get_factor(a, LOLDU_FACTOR_DIAG, &d)
            let magnitude = { (v: [Float]) in v.map { Double(abs($0)) } }
            let c = (0..<r).map { abs(0.8 * Double(z[$0]) - Double(d[$0])) }
            let hBound = matmul(magnitude(xf), transpose(magnitude(upper), r, n), batch, n, r)      // H
            let gBound = matmul(magnitude(dyf), magnitude(lower), batch, m, r)                       // Γ
            let yLow = matmul(hBound.enumerated().map { $0.element * c[$0.offset % r] }, transpose(magnitude(lower), m, r), batch, r, m)
            let yBase = matmul(magnitude(xf), transpose(magnitude(wf), m, n), batch, n, m)
            let weightRounding = path == LOLDU_PATH_FACTORED ? 0 : u  // W_eff's rounding, on the merged paths
            for i in 0..<(batch * m) {
                let bound = u * Double(abs(yRef[i])) + 4 * u * yLow[i] + (Double(n + r) * 0x1p-23 + weightRounding) * yBase[i]
                #expect(abs(Double(half.widen(y[i])) - Double(yRef[i])) <= bound, "\(what): y[\(i)] = \(half.widen(y[i])), float32 \(yRef[i]), bound \(bound)")
            }
            let dxLow = matmul(gBound.enumerated().map { $0.element * c[$0.offset % r] }, magnitude(upper), batch, r, n)
            let dxBase = matmul(magnitude(dyf), magnitude(wf), batch, m, n)
            for i in 0..<(batch * n) {
                let bound = u * Double(abs(dxRef[i])) + 4 * u * dxLow[i] + (Double(m + r) * 0x1p-23 + weightRounding) * dxBase[i]
                #expect(abs(Double(half.widen(dx[i])) - Double(dxRef[i])) <= bound, "\(what): dX[\(i)]")
            }
            let products = (0..<r).map { k in (0..<batch).reduce(0.0) { $0 + hBound[$1 * r + k] * gBound[$1 * r + k] } }
            for k in 0..<r {
                #expect(abs(Double(grads[k] - gradsRef[k])) <= 3 * u * 0.8 * products[k], "\(what): dz[\(k)]: \(grads[k]) vs \(gradsRef[k])")
            }
            let sigmaBound = 3 * u * (0..<r).reduce(0.0) { $0 + abs(Double(z[$1])) * products[$1] }
            #expect(abs(Double(grads[r] - gradsRef[r])) <= sigmaBound, "\(what): dσ: \(grads[r]) vs \(gradsRef[r])")
        }
    }

    static func grads(_ a: OpaquePointer, _ r: Int) -> [Float] {
        var g: UnsafeMutableRawPointer?
        _ = loldu_params(a, nil, &g)
        return Array(UnsafeBufferPointer(start: g!.assumingMemoryBound(to: Float.self), count: r + 1))
    }

    /// The library's conversions against the standard library's (f16) and an independent one
    /// (bf16): an identity layer (W = I, bias b) computes x + b in float32 and rounds it once,
    /// over normal and subnormal values, ties, overflow to infinity and NaN.
    @Test(arguments: Half.allCases)
    func conversionsRoundToNearestEven(_ half: Half) throws {
        #expect(loldu_set_widened_half(1) == LOLDU_OK)  // the library's own conversions, not a bf16 unit's
        defer { _ = loldu_set_widened_half(0) }
        let n = 64
        var identity = [UInt16](repeating: 0, count: n * n)
        for i in 0..<n { identity[i * n + i] = half.round(1) }
        var random = TestRandom(77)
        // x and b whose float32 sum needs rounding: mixed magnitudes, subnormals, overflow.
        let magnitudes: [Float] = half == .f16 ? [1e-7, 6e-8, 3e-5, 1, 1000, 60000, 65504] : [Float.leastNormalMagnitude / 12, 1e-20, 1, 3e38]
        var x: [UInt16] = [], b: [UInt16] = []
        for i in 0..<(4 * n) {
            let scale = magnitudes[i % magnitudes.count]
            x.append(half.round(scale * Float(random.symmetric())))
        }
        for i in 0..<n { b.append(half.round(magnitudes[(i / 3) % magnitudes.count] * Float(random.symmetric()))) }
        x[5] = half.round(.nan)  // a NaN input gives NaN outputs
        let a = try Self.adapter(half.dtype, m: n, n: n, weight: identity, bias: b, rank: 1)
        defer { loldu_adapter_free(a) }
        var y = [UInt16](repeating: 0, count: 4 * n)
        #expect(loldu_forward(a, 4, x, &y, nil) == LOLDU_OK)
        for row in 0..<4 {
            for j in 0..<n {
                let i = row * n + j
                let exact = half.widen(x[i]) + half.widen(b[j])  // exact in float32 for these formats' sums
                if row == 0 {
                    #expect(half.widen(y[i]).isNaN)  // x[5] is NaN: NaN · 0 reaches the whole row
                } else {
                    #expect(y[i] == half.round(exact), "\(half) \(half.widen(x[i])) + \(half.widen(b[j])) = \(exact): got \(half.widen(y[i])), expected \(half.widen(half.round(exact)))")
                }
            }
        }
    }

    /// A float32 adapter converted to bf16 (what autocast computes): the same factorisation, z and
    /// σ, the weight rounded once; at initialisation it is exactly the bf16 layer.
    @Test func convertedAdapterSharesTheFactorisation() throws {
        var random = TestRandom(9)
        let (m, n, r, batch) = (18, 14, 5, 4)
        let w: [Float] = random.array(m * n), b: [Float] = random.array(m)
        let source = try TestAdapter<Float>(m: m, n: n, weight: w, bias: b) { $0.rank = Int64(r) }
        var converted: OpaquePointer?
        #expect(loldu_adapter_convert(&converted, source.handle, LOLDU_BFLOAT16) == LOLDU_OK, "\(String(cString: loldu_last_error()))")
        defer { loldu_adapter_free(converted) }
        let rounded = w.map(Half.bf16.round), roundedBias = b.map(Half.bf16.round)
        let direct = try Self.adapter(LOLDU_BFLOAT16, m: m, n: n, weight: rounded, bias: roundedBias, rank: r)
        defer { loldu_adapter_free(direct) }
        let x = Self.values(.bf16, batch * n, &random)
        var y = [UInt16](repeating: 0, count: batch * m), yDirect = y
        #expect(loldu_forward(converted, Int64(batch), x, &y, nil) == LOLDU_OK)
        #expect(loldu_forward(direct, Int64(batch), x, &yDirect, nil) == LOLDU_OK)
        #expect(y == yDirect, "at initialisation: the bf16 layer on the rounded weight")
        var pivots = [Int32](repeating: 0, count: r), lower = [Float](repeating: 0, count: m * r)
        #expect(loldu_get_pivots(converted, &pivots) == LOLDU_OK && pivots == source.pivots)
        #expect(loldu_get_factor(converted, LOLDU_FACTOR_LOWER, &lower) == LOLDU_OK && lower == source.factor(LOLDU_FACTOR_LOWER))
        source.z = (0..<r).map { Float($0) }
        var again: OpaquePointer?
        #expect(loldu_adapter_convert(&again, source.handle, LOLDU_FLOAT16) == LOLDU_OK)
        defer { loldu_adapter_free(again) }
        var z = [Float](repeating: .nan, count: r)
        #expect(loldu_get_z(again, &z) == LOLDU_OK && z == source.z)
        // Its checkpoint is of the float32 weight it factors: it loads onto that weight's
        // adapter, and the bf16 adapter created on the rounded weight (whose factorisation
        // differs, with the same pivots here) refuses it.
        let directory = try temporaryDirectory()
        #expect(withCStrings(["layer"]) { loldu_checkpoint_save(directory, [again], $0, 1) } == LOLDU_OK)
        var checkpoint: OpaquePointer?
        #expect(loldu_checkpoint_open(&checkpoint, directory) == LOLDU_OK)
        defer { loldu_checkpoint_free(checkpoint) }
        #expect(loldu_get_pivots(direct, &pivots) == LOLDU_OK && pivots == source.pivots)
        #expect(loldu_checkpoint_apply(checkpoint, "layer", direct) == LOLDU_ERR_MISMATCH)
        #expect(String(cString: loldu_last_error()).contains("the base weight differs"))
        let copy = try TestAdapter<Float>(m: m, n: n, weight: w, bias: b) { $0.rank = Int64(r) }
        #expect(loldu_checkpoint_apply(checkpoint, "layer", copy.handle) == LOLDU_OK, "\(String(cString: loldu_last_error()))")
        #expect(copy.z == source.z)
        var failed: OpaquePointer?
        #expect(loldu_adapter_convert(&failed, source.handle, LOLDU_FLOAT64) == LOLDU_ERR_INVALID_ARGUMENT)
        let big = try TestAdapter<Float>(m: 2, n: 2, weight: [1e5, 1, 2, 3]) { $0.rank = 1 }
        #expect(loldu_adapter_convert(&failed, big.handle, LOLDU_FLOAT16) == LOLDU_ERR_NOT_FINITE)
        #expect(String(cString: loldu_last_error()).contains("dtype = float16: the weight does not fit it once rounded (weight[0, 0] is inf"))
    }

    /// A checkpoint saved from a half-precision model applies to its float32 copy (same values,
    /// same fingerprints); one saved on float32 values that bf16 cannot hold does not apply to
    /// the bf16 model (another weight), and the refusal says so; float64 is refused with the
    /// reason.
    @Test func checkpointsMoveBetweenAHalfModelAndItsFloat32Copy() throws {
        let directory = try temporaryDirectory()
        var random = TestRandom(5)
        let (m, n, r) = (20, 16, 6)
        let w = Self.values(.bf16, m * n, &random)
        let half = try Self.adapter(LOLDU_BFLOAT16, m: m, n: n, weight: w, bias: nil, rank: r)
        defer { loldu_adapter_free(half) }
        let z: [Float] = (0..<r).map { Float($0) * 0.25 - 0.5 }
        #expect(loldu_set_z(half, z) == LOLDU_OK)
        #expect(withCStrings(["layer"]) { loldu_checkpoint_save(directory, [half], $0, 1) } == LOLDU_OK)
        var checkpoint: OpaquePointer?
        #expect(loldu_checkpoint_open(&checkpoint, directory) == LOLDU_OK)
        defer { loldu_checkpoint_free(checkpoint) }
        var dtype = LOLDU_FLOAT32
        #expect(loldu_checkpoint_layer(checkpoint, "layer", &dtype, nil, nil, nil) == LOLDU_OK && dtype == LOLDU_BFLOAT16)
        let float = try Self.adapter(LOLDU_FLOAT32, m: m, n: n, weight: w.map(Half.bf16.widen), bias: nil, rank: r)
        defer { loldu_adapter_free(float) }
        #expect(loldu_checkpoint_apply(checkpoint, "layer", float) == LOLDU_OK, "\(String(cString: loldu_last_error()))")
        var got = [Float](repeating: 0, count: r)
        #expect(loldu_get_z(float, &got) == LOLDU_OK && got == z)
        let double = try Self.adapter(LOLDU_FLOAT64, m: m, n: n, weight: w.map { Double(Half.bf16.widen($0)) }, bias: nil, rank: r)
        defer { loldu_adapter_free(double) }
        #expect(loldu_checkpoint_apply(checkpoint, "layer", double) == LOLDU_ERR_MISMATCH)
        #expect(String(cString: loldu_last_error()).contains("float64"))

        // The other way: float32 values that bf16 rounds.
        let fine = (0..<(m * n)).map { _ in Float(random.symmetric()) + 0x1p-20 }
        let single = try Self.adapter(LOLDU_FLOAT32, m: m, n: n, weight: fine, bias: nil, rank: r)
        defer { loldu_adapter_free(single) }
        let singleDirectory = try temporaryDirectory()
        #expect(withCStrings(["layer"]) { loldu_checkpoint_save(singleDirectory, [single], $0, 1) } == LOLDU_OK)
        var saved: OpaquePointer?
        #expect(loldu_checkpoint_open(&saved, singleDirectory) == LOLDU_OK)
        defer { loldu_checkpoint_free(saved) }
        let rounded = fine.map { Half.bf16.round($0) }
        let halfCopy = try Self.adapter(LOLDU_BFLOAT16, m: m, n: n, weight: rounded, bias: nil, rank: r)
        defer { loldu_adapter_free(halfCopy) }
        #expect(loldu_checkpoint_apply(saved, "layer", halfCopy) == LOLDU_ERR_MISMATCH)
        let message = String(cString: loldu_last_error())
        #expect(message.contains("saved on a float32 weight and this one is bfloat16"), "\(message)")
    }

    /// Values of `W_eff` beyond float16's range (65504) are refused wherever they would be
    /// written in float16 — merging, the effective weight, a float16 LoRA export — and nothing
    /// is written.
    @Test func float16OverflowIsRefused() throws {
        var random = TestRandom(12)
        let (m, n, r) = (8, 8, 8)
        let w = Self.values(.f16, m * n, &random)
        let a = try Self.adapter(LOLDU_FLOAT16, m: m, n: n, weight: w, bias: nil, rank: r)
        defer { loldu_adapter_free(a) }
        #expect(loldu_set_sigma(a, 1e6) == LOLDU_OK)  // finite in float32, far beyond float16
        #expect(loldu_merge(a) == LOLDU_ERR_NOT_FINITE)
        #expect(String(cString: loldu_last_error()).contains("float16"))
        var info = loldu_adapter_info()
        #expect(loldu_adapter_get_info(a, &info, MemoryLayout<loldu_adapter_info>.size) == LOLDU_OK && info.merged == 0)
        var out = [UInt16](repeating: 0x1234, count: m * n)
        #expect(loldu_effective_weight(a, &out) == LOLDU_ERR_NOT_FINITE)
        #expect(out.allSatisfy { $0 == 0x1234 }, "a refused effective weight was written")
        let directory = try temporaryDirectory()
        var options = loldu_lora_options()
        #expect(loldu_lora_options_default(&options) == LOLDU_OK)
        options.dtype = LOLDU_FLOAT16.i32
        #expect(withCStrings(["layer"]) { loldu_export_lora("\(directory)/lora", [a], $0, 1, &options) } == LOLDU_ERR_NOT_FINITE)
        #expect(String(cString: loldu_last_error()).contains("W + lora_B lora_A would not be finite"))  // (in float16)
        #expect(access("\(directory)/lora", F_OK) != 0, "a refused export left a directory")
        #expect(withCStrings(["layer"]) { loldu_export_merged("\(directory)/merged.safetensors", [a], $0, 1) } == LOLDU_ERR_NOT_FINITE)
        #expect(access("\(directory)/merged.safetensors", F_OK) != 0, "a refused export left a file")

        // float32 too, where W_eff is built straight into the caller's buffer when it fits.
        let wide = w.map(Half.f16.widen)
        let single = try Self.adapter(LOLDU_FLOAT32, m: m, n: n, weight: wide, bias: nil, rank: r)
        defer { loldu_adapter_free(single) }
        #expect(loldu_set_z(single, [Float](repeating: 3e38, count: r)) == LOLDU_OK)
        var floats = [Float](repeating: 7, count: m * n)
        #expect(loldu_effective_weight(single, &floats) == LOLDU_ERR_NOT_FINITE)
        #expect(floats.allSatisfy { $0 == 7 }, "a refused float32 effective weight was written")
        #expect(loldu_set_z(single, [Float](repeating: 2, count: r)) == LOLDU_OK)
        #expect(loldu_effective_weight(single, &floats) == LOLDU_OK && floats.allSatisfy(\.isFinite))

        // Converting to float16 rounds the bias too: one beyond 65504 is refused.
        let bias = (0..<m).map { Float($0 == 3 ? 70000 : $0) }
        let biased = try Self.adapter(LOLDU_FLOAT32, m: m, n: n, weight: wide, bias: bias, rank: r)
        defer { loldu_adapter_free(biased) }
        var converted: OpaquePointer?
        #expect(loldu_adapter_convert(&converted, biased, LOLDU_FLOAT16) == LOLDU_ERR_NOT_FINITE)
        #expect(converted == nil && String(cString: loldu_last_error()).contains("bias"))
    }
}
