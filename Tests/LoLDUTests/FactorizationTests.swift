import CLoLDU
import Testing

/// The partial (panel) LU against LAPACK's full factorisation, and `P L D U = W`.
@Suite struct FactorizationTests {
    /// (m, n, r): m > n, m < n, m = n, r = 1, r = min(m, n).
    static let shapes: [(Int, Int, Int)] = [
        (40, 25, 7), (25, 40, 9), (32, 32, 32), (30, 20, 1), (20, 30, 20), (50, 50, 13), (1, 6, 1), (6, 1, 1),
    ]

    @Test func panelEqualsFirstStepsOfFullGetrf() throws {
        try check(Float.self)
        try check(Double.self)

        func check<T: TestScalar>(_: T.Type) throws {
            var random = TestRandom(7)
            for (m, n, r) in Self.shapes {
                let w: [T] = random.array(m * n)
                let adapter = try TestAdapter<T>(m: m, n: n, weight: w) { $0.rank = Int64(r) }

                // Oracle: LAPACK's full dgetrf of W's values.
                let k = min(m, n)
                var lu = w.map { Double($0) }
                var ipiv = [Int32](repeating: 0, count: k)
                #expect(oracleGetrf(m: m, n: n, a: &lu, ipiv: &ipiv) == 0)
                var perm = Array(0..<m)
                for j in 0..<k { perm.swapAt(j, Int(ipiv[j]) - 1) }
                var pl = [Double](repeating: 0, count: m * r)  // (P L)[:, :r]
                for i in 0..<m {
                    for j in 0..<r { pl[perm[i] * r + j] = i > j ? lu[i * n + j] : (i == j ? 1 : 0) }
                }
                let d = (0..<r).map { lu[$0 * n + $0] }
                var ur = [Double](repeating: 0, count: r * n)
                for i in 0..<r {
                    for j in i..<n { ur[i * n + j] = lu[i * n + j] / d[i] }
                }

                let what = "\(T.self) m=\(m) n=\(n) r=\(r)"
                #expect(adapter.pivots == Array(ipiv[0..<r]), "\(what): pivots")
                let tol = tolerance(T.self)
                expectClose(adapter.factor(LOLDU_FACTOR_LOWER), pl, rtol: tol, atol: tol, "\(what): P L_r")
                expectClose(adapter.factor(LOLDU_FACTOR_DIAG), d, rtol: tol, atol: tol, "\(what): D_r")
                expectClose(adapter.factor(LOLDU_FACTOR_UPPER), ur, rtol: tol, atol: tol, "\(what): U_r")
                #expect(adapter.info.degenerate_pivots == 0)
            }
        }
    }

    /// W of known rank k, exactly (small-integer factors times a power of two, so the product is
    /// exact in float and double), factored with r > k: exactly r − k pivots are degenerate, the
    /// first k equal dgetrf's, every factor is finite and the layer is still exactly W. Double
    /// weights rounded from a double product of Gaussian factors are caught as well.
    @Test func knownRankWeightHasExactlyItsDegeneratePivots() throws {
        try check(Float.self)
        try check(Double.self)

        func check<T: TestScalar>(_: T.Type) throws {
            var random = TestRandom(23)
            for (m, n, k, exponent) in [(64, 48, 40, -6), (96, 96, 1, 3), (40, 120, 20, 0), (120, 40, 33, -20), (50, 50, 49, 10),
                                         (200, 150, 90, -3), (96, 200, 50, 2), (300, 300, 200, -3), (150, 100, 99, 0)] {
                let integers = { (count: Int) in (0..<count).map { _ in Double(Int(random.next() % 17) - 8) } }
                let b = integers(m * k), c = integers(k * n)
                let w = matmul(b, c, m, k, n).map { T($0 * Double(sign: .plus, exponent: exponent, significand: 1)) }
                try expectRank(w, m: m, n: n, k: k, "\(T.self) exact rank \(k) of \(m)x\(n)")
            }
            if T.self == Double.self {
                for (m, n, k) in [(80, 60, 30), (60, 90, 59)] {
                    let b: [Double] = random.array(m * k), c: [Double] = random.array(k * n)
                    try expectRank(matmul(b, c, m, k, n).map { T($0) }, m: m, n: n, k: k, "double product of rank \(k)")
                }
            }
        }

        func expectRank<T: TestScalar>(_ w: [T], m: Int, n: Int, k: Int, _ what: String) throws {
            let r = min(m, n)
            let adapter = try TestAdapter<T>(m: m, n: n, weight: w) { $0.rank = Int64(r) }
            #expect(adapter.info.degenerate_pivots == Int64(r - k), "\(what): degenerate pivots")
            var lu = w.map { Double($0) }
            var ipiv = [Int32](repeating: 0, count: r)
            _ = oracleGetrf(m: m, n: n, a: &lu, ipiv: &ipiv)
            #expect(Array(adapter.pivots[0..<k]) == Array(ipiv[0..<k]), "\(what): the first \(k) pivots are dgetrf's")
            let upper = adapter.factor(LOLDU_FACTOR_UPPER)
            for j in k..<r {
                #expect((0..<n).allSatisfy { upper[j * n + $0] == ($0 == j ? 1 : 0) }, "\(what): U row \(j) is e_j")
            }
            for factor in [LOLDU_FACTOR_LOWER, LOLDU_FACTOR_DIAG, LOLDU_FACTOR_UPPER] {
                #expect(adapter.factor(factor).allSatisfy { $0.isFinite }, "\(what): factor \(factor.rawValue) finite")
            }
            var random = TestRandom(3)
            let x: [T] = random.array(2 * n)
            let y = adapter.forward(x, batch: 2), bare = bareLayer(x, w, nil, batch: 2, m: m, n: n)
            if sameGEMM(as: T.self) {
                #expect(y == bare, "\(what): exactly W at init")
            } else {  // (another library's product: the same to its rounding)
                let scale = bare.map { abs(Double($0)) }.max() ?? 0
                expectClose(y, bare, rtol: tolerance(T.self), atol: 1e-5 * scale, "\(what): W at init")
            }
        }
    }

    /// Real weights have no degenerate pivot at full rank (the rule does not eat genuine ones).
    @Test func fullRankRandomWeightHasNoDegeneratePivot() throws {
        var random = TestRandom(29)
        for n in [256, 700] {
            let w: [Float] = random.array(n * n)
            let adapter = try TestAdapter<Float>(m: n, n: n, weight: w) { $0.rank = Int64(n) }
            #expect(adapter.info.degenerate_pivots == 0)
        }
    }

    @Test func fullRankFactorsReproduceW() throws {
        try check(Float.self)
        try check(Double.self)

        func check<T: TestScalar>(_: T.Type) throws {
            var random = TestRandom(11)
            for (m, n) in [(9, 5), (5, 9), (12, 12)] {
                let k = min(m, n)
                let w: [T] = random.array(m * n)
                let adapter = try TestAdapter<T>(m: m, n: n, weight: w) { $0.rank = Int64(k) }
                let a = adapter.factor(LOLDU_FACTOR_LOWER), d = adapter.factor(LOLDU_FACTOR_DIAG)
                let u = adapter.factor(LOLDU_FACTOR_UPPER)
                var ad = a
                for i in 0..<m { for j in 0..<k { ad[i * k + j] *= d[j] } }
                let product = matmul(ad, u, m, k, n)
                let tol = tolerance(T.self)
                expectClose(product, w.map { Double($0) }, rtol: tol, atol: tol, "\(T.self) \(m)x\(n): P L D U = W")
                // U_r is unit upper trapezoidal; L_r, with rows un-permuted, is unit lower.
                for i in 0..<k {
                    #expect(u[i * n + i] == 1)
                    for j in 0..<i { #expect(u[i * n + j] == 0) }
                }
                let residual = adapter.factor(LOLDU_FACTOR_RESIDUAL)
                expectClose(residual, [Double](repeating: 0, count: m * n), rtol: 0, atol: 10 * tol,
                            "\(T.self) \(m)x\(n): full-rank residual with z_ref = D is zero")
            }
        }
    }

    @Test func rankDeficientWeightStaysFinite() throws {
        try check(Float.self)
        try check(Double.self)

        func check<T: TestScalar>(_: T.Type) throws {
            var random = TestRandom(5)
            let m = 7, n = 5, batch = 3
            // Column 1 = column 0 and column 3 = 0: pivots 1 and 3 vanish.
            var w: [T] = random.array(m * n)
            for i in 0..<m { w[i * n + 1] = w[i * n]; w[i * n + 3] = 0 }
            let zero = [T](repeating: 0, count: m * n)
            for (weight, expectedDegenerate) in [(w, 2), (zero, 5)] {
                let adapter = try TestAdapter<T>(m: m, n: n, weight: weight) { $0.rank = 5 }
                #expect(adapter.info.degenerate_pivots == Int64(expectedDegenerate))
                for factor in [LOLDU_FACTOR_LOWER, LOLDU_FACTOR_DIAG, LOLDU_FACTOR_UPPER, LOLDU_FACTOR_RESIDUAL] {
                    #expect(adapter.factor(factor).allSatisfy { $0.isFinite }, "factor \(factor.rawValue) finite")
                }
                let x: [T] = random.array(batch * n)
                // At initialisation the layer is exactly W, degenerate pivots or not.
                #expect(adapter.forward(x, batch: batch) == bareLayer(x, weight, nil, batch: batch, m: m, n: n))
                adapter.z = (0..<5).map { T($0) + 0.5 }
                for path in allPaths {
                    adapter.setPath(path)
                    let y = adapter.forward(x, batch: batch)
                    let dx = adapter.backward(x, random.array(batch * m), batch: batch)
                    #expect(y.allSatisfy { $0.isFinite } && dx.allSatisfy { $0.isFinite })
                    #expect(adapter.grads.allSatisfy { $0.isFinite })
                }
            }
        }
    }

    /// NaN (any payload or sign) and ±Inf are refused wherever they sit, named by position; the
    /// largest finite values are accepted. Small shapes exercise the vector loop's tail; a 2048²
    /// weight takes the split (two-thread) pass, copied and borrowed.
    @Test func nonFiniteWeightIsRefused() throws {
        try check(Float.self)
        try check(Double.self)

        func check<T: TestScalar>(_: T.Type) throws {
            let bad: [T] = [.nan, -.nan, .signalingNaN, .infinity, -.infinity]
            for (m, n, at) in [(3, 4, (1, 2)), (3, 5, (2, 4)), (2048, 2048, (1536, 7))] {
                let big = m * n >= 1 << 22
                for value in big ? [T.nan, -.infinity] : bad {
                    for borrow in big ? [false, true] : [false] {
                        var w = [T](repeating: 1, count: m * n)
                        w[at.0 * n + at.1] = value
                        let error = #expect(throws: LibraryError.self) {
                            _ = try TestAdapter<T>(m: m, n: n, weight: w) { $0.rank = 2; $0.borrow_weight = borrow ? 1 : 0 }
                        }
                        #expect(error?.status == LOLDU_ERR_NOT_FINITE)
                        #expect(error?.message.contains("weight[\(at.0), \(at.1)]") == true, "\(error?.message ?? "")")
                    }
                }
            }
            for value in bad {
                var b = [T](repeating: 0, count: 3)
                b[2] = value
                let error = #expect(throws: LibraryError.self) {
                    _ = try TestAdapter<T>(m: 3, n: 4, weight: [T](repeating: 1, count: 12), bias: b) { $0.rank = 2 }
                }
                #expect(error?.status == LOLDU_ERR_NOT_FINITE)
                #expect(error?.message.contains("bias[2]") == true, "\(error?.message ?? "")")
            }
            // The extremes of the finite range are accepted and give finite factors with |L| ≤ 1,
            // a subnormal pivot included (BLAS would scale by its infinite reciprocal).
            for value in [T.greatestFiniteMagnitude, -.greatestFiniteMagnitude, .leastNonzeroMagnitude] {
                var w = [T](repeating: 0, count: 12)
                w[0] = value
                w[4] = value / 2
                w[5] = 1
                w[10] = 1
                let adapter = try TestAdapter<T>(m: 3, n: 4, weight: w) { $0.rank = 3 }
                let lower = adapter.factor(LOLDU_FACTOR_LOWER)
                #expect(lower.allSatisfy { abs($0) <= 1 }, "\(T.self) \(value): \(lower)")
                for which in [LOLDU_FACTOR_DIAG, LOLDU_FACTOR_UPPER, LOLDU_FACTOR_RESIDUAL] {
                    let factor = adapter.factor(which)
                    #expect(factor.allSatisfy { $0.isFinite }, "\(T.self) \(value): \(factor)")
                }
            }
        }
    }
}
