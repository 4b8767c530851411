import CLoLDU
import Testing

/// Forward and backward on every compute path: unchanged at initialisation, gradients against
/// central finite differences, paths against each other, weight space against backward.
@Suite struct ForwardBackwardTests {
    /// (m, n, r, batch)
    static let shapes: [(Int, Int, Int, Int)] = [(5, 3, 2, 4), (3, 7, 3, 2), (6, 6, 1, 5), (8, 5, 5, 3), (7, 9, 4, 6)]

    @Test func outputUnchangedAtInitialisation() throws {
        try check(Float.self)
        try check(Double.self)

        func check<T: TestScalar>(_: T.Type) throws {
            var random = TestRandom(3)
            for (m, n, r, batch) in Self.shapes {
                let w: [T] = random.array(m * n), b: [T] = random.array(m), x: [T] = random.array(batch * n)
                let bare = bareLayer(x, w, b, batch: batch, m: m, n: n)
                let cases = allInits.map { ($0, LOLDU_RESIDUAL_INIT) } + [(LOLDU_INIT_LU, LOLDU_RESIDUAL_PIVOTS)]
                for (zInit, residual) in cases {
                    let adapter = try TestAdapter<T>(m: m, n: n, weight: w, bias: b) {
                        $0.rank = Int64(r); $0.z_init = zInit.i32; $0.residual = residual.i32
                        $0.seed = 99; $0.alpha = 3
                    }
                    for path in allPaths {
                        adapter.setPath(path)
                        // Bit for bit: c = σ z − σ₀ z_ref is exactly zero.
                        #expect(adapter.forward(x, batch: batch) == bare,
                                "\(T.self) \(m)x\(n) r=\(r) init \(zInit.i32) residual \(residual.i32) path \(path.rawValue)")
                    }
                }
                // The paper's residual with a non-LU init changes the output at initialisation.
                let changed = try TestAdapter<T>(m: m, n: n, weight: w, bias: b) {
                    $0.rank = Int64(r); $0.z_init = LOLDU_INIT_ONES.i32
                }
                #expect(changed.forward(x, batch: batch) != bare)
            }
        }
    }

    /// Loss `L = Σ y ⊙ R`, so `dY = R`.
    private func loss(_ adapter: TestAdapter<Double>, _ x: [Double], _ weights: [Double], batch: Int) -> Double {
        zip(adapter.forward(x, batch: batch), weights).reduce(0) { $0 + $1.0 * $1.1 }
    }

    @Test(arguments: allPaths)
    func gradientsMatchFiniteDifferences(path: loldu_path) throws {
        var random = TestRandom(17)
        let step = 1e-6
        for (m, n, r, batch) in Self.shapes {
            let w: [Double] = random.array(m * n), b: [Double] = random.array(m)
            let x: [Double] = random.array(batch * n), dy: [Double] = random.array(batch * m)
            let what = "\(m)x\(n) r=\(r) B=\(batch) path \(path.rawValue)"
            let adapter = try TestAdapter<Double>(m: m, n: n, weight: w, bias: b) { $0.rank = Int64(r) }
            adapter.setPath(path)
            adapter.z = random.array(r)
            adapter.sigma = 0.7
            let z = adapter.z

            for keepH in [false, true] {
                adapter.zeroGrad()
                var h = [Double](repeating: .nan, count: batch * r)
                let dx: [Double] = h.withUnsafeMutableBufferPointer { hp in
                    _ = adapter.forward(x, batch: batch, h: keepH ? hp.baseAddress : nil)
                    return adapter.backward(x, dy, batch: batch, h: keepH ? UnsafePointer(hp.baseAddress) : nil)
                }
                let grads = adapter.grads

                var fdX = [Double](repeating: 0, count: batch * n)
                for i in 0..<(batch * n) {
                    var xp = x, xm = x
                    xp[i] += step; xm[i] -= step
                    fdX[i] = (loss(adapter, xp, dy, batch: batch) - loss(adapter, xm, dy, batch: batch)) / (2 * step)
                }
                expectClose(dx, fdX, rtol: 1e-6, atol: 1e-7, "\(what) keepH \(keepH): dX")

                var fdZ = [Double](repeating: 0, count: r)
                for k in 0..<r {
                    var zp = z, zm = z
                    zp[k] += step; zm[k] -= step
                    adapter.z = zp
                    let lp = loss(adapter, x, dy, batch: batch)
                    adapter.z = zm
                    fdZ[k] = (lp - loss(adapter, x, dy, batch: batch)) / (2 * step)
                }
                adapter.z = z
                expectClose(Array(grads[0..<r]), fdZ, rtol: 1e-6, atol: 1e-7, "\(what) keepH \(keepH): dz")

                adapter.sigma = 0.7 + step
                let lp = loss(adapter, x, dy, batch: batch)
                adapter.sigma = 0.7 - step
                let fdSigma = (lp - loss(adapter, x, dy, batch: batch)) / (2 * step)
                adapter.sigma = 0.7
                expectClose([grads[r]], [fdSigma], rtol: 1e-6, atol: 1e-7, "\(what) keepH \(keepH): dσ")

                // db by finite differences: adapters built on a perturbed bias.
                var fdB = [Double](repeating: 0, count: m)
                for i in 0..<m {
                    var losses = [Double]()
                    for sign in [1.0, -1.0] {
                        var bb = b
                        bb[i] += sign * step
                        let other = try TestAdapter<Double>(m: m, n: n, weight: w, bias: bb) { $0.rank = Int64(r) }
                        other.z = z
                        other.sigma = 0.7
                        losses.append(loss(other, x, dy, batch: batch))
                    }
                    fdB[i] = (losses[0] - losses[1]) / (2 * step)
                }
                expectClose(adapter.biasGrad, fdB, rtol: 1e-6, atol: 1e-7, "\(what) keepH \(keepH): db")
            }
        }
    }

    @Test func pathsAgree() throws {
        try check(Float.self)
        try check(Double.self)

        func check<T: TestScalar>(_: T.Type) throws {
            var random = TestRandom(23)
            for (m, n, r, batch) in Self.shapes + [(24, 16, 16, 40), (16, 24, 3, 2)] {
                let w: [T] = random.array(m * n), b: [T] = random.array(m)
                let x: [T] = random.array(batch * n), dy: [T] = random.array(batch * m)
                let z: [T] = random.array(r)
                var results: [(y: [T], dx: [T], grads: [T], db: [T])] = []
                for path in allPaths {
                    let adapter = try TestAdapter<T>(m: m, n: n, weight: w, bias: b) { $0.rank = Int64(r) }
                    adapter.setPath(path)
                    adapter.z = z
                    adapter.sigma = 1.3
                    let y = adapter.forward(x, batch: batch)
                    let dx = adapter.backward(x, dy, batch: batch)
                    results.append((y, dx, adapter.grads, adapter.biasGrad))
                }
                let tol = tolerance(T.self) * 10
                for (i, other) in results.enumerated().dropFirst() {
                    let what = "\(T.self) \(m)x\(n) r=\(r): path \(allPaths[i].rawValue) vs factored"
                    expectClose(other.y, results[0].y, rtol: tol, atol: tol, "\(what) y")
                    expectClose(other.dx, results[0].dx, rtol: tol, atol: tol, "\(what) dX")
                    expectClose(other.grads, results[0].grads, rtol: tol, atol: tol, "\(what) dz, dσ")
                    expectClose(other.db, results[0].db, rtol: tol, atol: tol, "\(what) db")
                }
            }
        }
    }

    @Test func weightSpaceMatchesLayer() throws {
        try check(Float.self)
        try check(Double.self)

        func check<T: TestScalar>(_: T.Type) throws {
            var random = TestRandom(29)
            for (m, n, r, batch) in Self.shapes {
                let w: [T] = random.array(m * n), b: [T] = random.array(m)
                let x: [T] = random.array(batch * n), dy: [T] = random.array(batch * m)
                let layer = try TestAdapter<T>(m: m, n: n, weight: w, bias: b) { $0.rank = Int64(r) }
                let weightSpace = try TestAdapter<T>(m: m, n: n, weight: w, bias: b) { $0.rank = Int64(r) }
                let z: [T] = random.array(r)
                layer.z = z
                weightSpace.z = z
                let tol = tolerance(T.self) * 10
                let what = "\(T.self) \(m)x\(n) r=\(r)"

                let weff = weightSpace.effectiveWeight
                let y = layer.forward(x, batch: batch)
                expectClose(y, bareLayer(x, weff, b, batch: batch, m: m, n: n), rtol: tol, atol: tol, "\(what): y = x W_effᵀ + b")

                layer.backward(x, dy, batch: batch)
                // dW = dYᵀ x
                let dw = matmul(transpose(dy, batch, m), x, m, batch, n).map { T($0) }
                #expect(loldu_weight_backward(weightSpace.handle, dw) == LOLDU_OK)
                expectClose(weightSpace.grads, layer.grads, rtol: tol, atol: tol, "\(what): weight-space dz, dσ")
            }
        }
    }

    @Test func gradientsAccumulateUntilZeroed() throws {
        var random = TestRandom(31)
        let (m, n, r, batch) = (6, 4, 3, 5)
        let adapter = try TestAdapter<Double>(m: m, n: n, weight: random.array(m * n), bias: random.array(m)) {
            $0.rank = Int64(r)
        }
        let x: [Double] = random.array(batch * n), dy: [Double] = random.array(batch * m)
        adapter.backward(x, dy, batch: batch)
        let once = adapter.grads, onceBias = adapter.biasGrad
        adapter.backward(x, dy, batch: batch)
        expectClose(adapter.grads, once.map { 2 * $0 }, rtol: 1e-12, atol: 1e-14, "twice dz")
        expectClose(adapter.biasGrad, onceBias.map { 2 * $0 }, rtol: 1e-12, atol: 1e-14, "twice db")
        #expect(once.contains { $0 != 0 })
        adapter.zeroGrad()
        #expect(adapter.grads.allSatisfy { $0 == 0 } && adapter.biasGrad.allSatisfy { $0 == 0 })
    }

    @Test func fixedSigmaGetsNoGradient() throws {
        var random = TestRandom(37)
        let adapter = try TestAdapter<Float>(m: 5, n: 4, weight: random.array(20)) {
            $0.rank = 4; $0.alpha = 2; $0.train_sigma = 0
        }
        #expect(adapter.sigma == 0.5)
        #expect(adapter.info.num_trainable == 4)
        adapter.backward(random.array(12), random.array(15), batch: 3)
        #expect(adapter.grads[4] == 0)
        #expect(adapter.grads[0..<4].contains { $0 != 0 })
    }

    /// loldu_backward_into writes the call's dz, dσ where the caller says, leaves the adapter's
    /// gradients alone, and agrees with loldu_backward on every path.
    @Test func backwardIntoWritesThisCallsGradients() throws {
        var random = TestRandom(601)
        let (m, n, r, batch) = (14, 11, 5, 6)
        let a = try TestAdapter<Float>(m: m, n: n, weight: random.array(m * n), bias: random.array(m)) { $0.rank = Int64(r) }
        a.z = random.array(r)
        let x: [Float] = random.array(batch * n), dy: [Float] = random.array(batch * m)
        for path in allPaths {
            a.setPath(path)
            a.zeroGrad()
            let dx = a.backward(x, dy, batch: batch)
            let expected = a.grads
            a.zeroGrad()
            var grads = [Float](repeating: .nan, count: r + 1), dxInto = [Float](repeating: .nan, count: batch * n)
            #expect(loldu_backward_into(a.handle, Int64(batch), x, dy, &dxInto, nil, &grads) == LOLDU_OK)
            #expect(grads == expected && dxInto == dx, "path \(path.rawValue)")
            #expect(a.grads.allSatisfy { $0 == 0 } && a.biasGrad.allSatisfy { $0 == 0 }, "the adapter's own gradients stay zero")
        }
        #expect(loldu_backward_into(a.handle, Int64(batch), x, dy, nil, nil, nil) == LOLDU_ERR_NULL_POINTER)
        var zero = [Float](repeating: .nan, count: r + 1)
        #expect(loldu_backward_into(a.handle, 0, nil, nil, nil, nil, &zero) == LOLDU_OK && zero.allSatisfy { $0 == 0 })
    }

    /// loldu_forward_bias on an adapter without a bias computes what the same adapter created
    /// with that bias computes, bit for bit, on every path and in both states (enabled,
    /// disabled); NULL is loldu_forward; an adapter with a bias of its own refuses, writing
    /// nothing.
    @Test func biasGivenPerCallEqualsTheLayersOwn() throws {
        // The second shape is above the size below which float32 products skip oneDNN (its own
        // bias argument); the first is below it.
        for (m, n, r, batch) in [(13, 10, 4, 7), (64, 48, 16, 8)] {
            try check(Float.self, m, n, r, batch)
            try check(Double.self, m, n, r, batch)
        }

        func check<T: TestScalar>(_: T.Type, _ m: Int, _ n: Int, _ r: Int, _ batch: Int) throws {
            var random = TestRandom(611)
            let w: [T] = random.array(m * n), b: [T] = random.array(m), x: [T] = random.array(batch * n)
            let plain = try TestAdapter<T>(m: m, n: n, weight: w) { $0.rank = Int64(r) }
            let own = try TestAdapter<T>(m: m, n: n, weight: w, bias: b) { $0.rank = Int64(r) }
            let z: [T] = random.array(r)
            plain.z = z
            own.z = z
            for enabled: Int32 in [1, 0] {
                #expect(loldu_set_enabled(plain.handle, enabled) == LOLDU_OK && loldu_set_enabled(own.handle, enabled) == LOLDU_OK)
                for path in allPaths {
                    plain.setPath(path)
                    own.setPath(path)
                    var y = [T](repeating: .nan, count: batch * m)
                    #expect(loldu_forward_bias(plain.handle, Int64(batch), x, b, &y, nil) == LOLDU_OK)
                    #expect(y == own.forward(x, batch: batch), "\(T.self) enabled \(enabled) path \(path.rawValue)")
                    #expect(loldu_forward_bias(plain.handle, Int64(batch), x, nil, &y, nil) == LOLDU_OK)
                    #expect(y == plain.forward(x, batch: batch), "\(T.self): NULL bias is loldu_forward")
                }
            }
            #expect(loldu_forward_bias(plain.handle, Int64(batch), x, b, nil, nil) == LOLDU_ERR_NULL_POINTER)
            var untouched = [T](repeating: .nan, count: batch * m)
            #expect(loldu_forward_bias(own.handle, Int64(batch), x, b, &untouched, nil) == LOLDU_ERR_STATE)
            #expect(String(cString: loldu_last_error()).contains("bias"))
            #expect(untouched.allSatisfy { $0.isNaN }, "nothing written on failure")
            #expect(loldu_forward_bias(own.handle, 0, nil, b, nil, nil) == LOLDU_ERR_STATE, "whatever the batch")
            // A misaligned bias is refused by name.
            var bytes = [UInt8](repeating: 0, count: (m + 1) * MemoryLayout<T>.stride)
            var y = [T](repeating: 0, count: batch * m)
            let status = bytes.withUnsafeMutableBytes { loldu_forward_bias(plain.handle, Int64(batch), x, $0.baseAddress! + 1, &y, nil) }
            #expect(status == LOLDU_ERR_INVALID_ARGUMENT && String(cString: loldu_last_error()).contains("bias"))
        }
    }
}
