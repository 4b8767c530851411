import CLoLDU
import Dispatch
import Testing

/// Merge and unmerge, enable and disable, clones, initialisation, version and threads.
@Suite struct StateTests {
    @Test func mergeUnmergeRoundTrip() throws {
        try check(Float.self)
        try check(Double.self)

        func check<T: TestScalar>(_: T.Type) throws {
            var random = TestRandom(41)
            let (m, n, r, batch) = (9, 7, 5, 4)
            let adapter = try TestAdapter<T>(m: m, n: n, weight: random.array(m * n), bias: random.array(m)) {
                $0.rank = Int64(r)
            }
            adapter.setPath(LOLDU_PATH_FACTORED)
            adapter.z = random.array(r)
            let x: [T] = random.array(batch * n), dy: [T] = random.array(batch * m)
            let before = adapter.forward(x, batch: batch)
            let dxBefore = adapter.backward(x, dy, batch: batch)
            adapter.zeroGrad()

            #expect(loldu_merge(adapter.handle) == LOLDU_OK)
            #expect(loldu_merge(adapter.handle) == LOLDU_OK)  // idempotent
            #expect(adapter.info.merged == 1)
            #expect(adapter.info.bytes_merged == Int64(m * n * MemoryLayout<T>.size))
            let tol = tolerance(T.self) * 10
            expectClose(adapter.forward(x, batch: batch), before, rtol: tol, atol: tol, "\(T.self) merged forward")
            expectClose(adapter.backward(x, dy, batch: batch), dxBefore, rtol: tol, atol: tol, "\(T.self) merged dX")
            #expect(adapter.grads.allSatisfy { $0 == 0 }, "a merged adapter's z is out of the graph")

            // z and σ are frozen while merged.
            let z = adapter.z
            #expect(loldu_set_z(adapter.handle, z) == LOLDU_ERR_STATE)
            #expect(String(cString: loldu_last_error()).contains("merged"))
            #expect(loldu_set_sigma(adapter.handle, 2) == LOLDU_ERR_STATE)

            #expect(loldu_unmerge(adapter.handle) == LOLDU_OK)
            #expect(loldu_unmerge(adapter.handle) == LOLDU_OK)
            #expect(adapter.info.merged == 0)
            #expect(adapter.forward(x, batch: batch) == before, "\(T.self): unmerge is exact")
        }
    }

    @Test func disabledAdapterIsThePretrainedLayer() throws {
        try check(Float.self)
        try check(Double.self)

        func check<T: TestScalar>(_: T.Type) throws {
            var random = TestRandom(43)
            let (m, n, r, batch) = (8, 6, 4, 3)
            let w: [T] = random.array(m * n), b: [T] = random.array(m)
            let x: [T] = random.array(batch * n), dy: [T] = random.array(batch * m)
            let bare = bareLayer(x, w, b, batch: batch, m: m, n: n)
            for residual in [LOLDU_RESIDUAL_PIVOTS, LOLDU_RESIDUAL_INIT] {
                for zInit in [LOLDU_INIT_LU, LOLDU_INIT_S_NORMAL] {
                    let adapter = try TestAdapter<T>(m: m, n: n, weight: w, bias: b) {
                        $0.rank = Int64(r); $0.residual = residual.i32; $0.z_init = zInit.i32
                    }
                    adapter.z = random.array(r)
                    adapter.sigma = 1.7
                    let adapted = adapter.forward(x, batch: batch)
                    #expect(adapted != bare)
                    for merged in [false, true] {
                        if merged { #expect(loldu_merge(adapter.handle) == LOLDU_OK) }
                        #expect(loldu_set_enabled(adapter.handle, 0) == LOLDU_OK)
                        #expect(adapter.info.enabled == 0)
                        let what = "\(T.self) residual \(residual.i32) init \(zInit.i32) merged \(merged)"
                        #expect(adapter.forward(x, batch: batch) == bare, "\(what): disabled is x Wᵀ + b exactly")
                        #expect(adapter.effectiveWeight == w, "\(what): disabled weight is W")
                        adapter.zeroGrad()
                        let dx = adapter.backward(x, dy, batch: batch)
                        let tol = tolerance(T.self)
                        expectClose(dx, matmul(dy, w, batch, m, n), rtol: tol, atol: tol, "\(what): disabled dX = dY W")
                        #expect(adapter.grads.allSatisfy { $0 == 0 }, "\(what): no dz while disabled")
                        #expect(loldu_set_enabled(adapter.handle, 1) == LOLDU_OK)
                        expectClose(adapter.forward(x, batch: batch), adapted, rtol: tol, atol: tol, "\(what): re-enabled")
                        if merged { #expect(loldu_unmerge(adapter.handle) == LOLDU_OK) }
                    }
                }
            }
        }
    }

    @Test func cloneSharesFactorsNotState() throws {
        var random = TestRandom(47)
        let (m, n, r, batch) = (7, 5, 3, 2)
        let adapter = try TestAdapter<Float>(m: m, n: n, weight: random.array(m * n)) { $0.rank = Int64(r) }
        adapter.z = [1, 2, 3]
        var cloneHandle: OpaquePointer?
        #expect(loldu_adapter_clone(&cloneHandle, adapter.handle) == LOLDU_OK)
        defer { loldu_adapter_free(cloneHandle) }
        var z = [Float](repeating: 0, count: r)
        #expect(loldu_get_z(cloneHandle, &z) == LOLDU_OK)
        #expect(z == [1, 2, 3])
        let x: [Float] = random.array(batch * n)
        var y = [Float](repeating: 0, count: batch * m)
        #expect(loldu_forward(cloneHandle, Int64(batch), x, &y, nil) == LOLDU_OK)
        #expect(y == adapter.forward(x, batch: batch))
        #expect(loldu_set_z(cloneHandle, [Float](repeating: 0, count: r)) == LOLDU_OK)
        #expect(adapter.z == [1, 2, 3])
        var factor = [Float](repeating: 0, count: m * r)
        #expect(loldu_get_factor(cloneHandle, LOLDU_FACTOR_LOWER, &factor) == LOLDU_OK)
        #expect(factor == adapter.factor(LOLDU_FACTOR_LOWER))
    }

    /// The header's thread-safety promise: clones (sharing the frozen factors) used from several
    /// threads at once compute what each computes alone, creating and freeing adapters meanwhile
    /// is safe, and each thread reads its own last error.
    @Test func clonesRunConcurrently() throws {
        var random = TestRandom(59)
        let (m, n, r, batch, threads, rounds) = (96, 64, 24, 48, 4, 20)
        let base = try TestAdapter<Float>(m: m, n: n, weight: random.array(m * n), bias: random.array(m)) {
            $0.rank = Int64(r)
        }
        let x: [Float] = random.array(batch * n), dy: [Float] = random.array(batch * m)
        final class Slot: @unchecked Sendable {  // one per thread, touched by that thread only
            var steps: [[Float]] = []
            var failures: [String] = []
        }
        final class Shared: @unchecked Sendable {
            var clones: [OpaquePointer] = []
            var slots: [Slot] = []
        }
        let shared = Shared()
        for t in 0..<threads {
            var clone: OpaquePointer?
            #expect(loldu_adapter_clone(&clone, base.handle) == LOLDU_OK)
            #expect(loldu_set_z(clone, (0..<r).map { Float($0 + t) / Float(r) }) == LOLDU_OK)
            shared.clones.append(clone!)
        }
        defer { shared.clones.forEach { loldu_adapter_free($0) } }

        /// y, dX and the gradients of one step, concatenated; nil if any call failed.
        @Sendable func step(_ a: OpaquePointer) -> [Float]? {
            var y = [Float](repeating: .nan, count: batch * m), dx = [Float](repeating: .nan, count: batch * n)
            var grads: UnsafeMutableRawPointer?
            guard loldu_zero_grad(a) == LOLDU_OK, loldu_forward(a, Int64(batch), x, &y, nil) == LOLDU_OK,
                  loldu_backward(a, Int64(batch), x, dy, &dx, nil) == LOLDU_OK,
                  loldu_params(a, nil, &grads) == LOLDU_OK, let grads
            else { return nil }
            return y + dx + Array(UnsafeBufferPointer(start: grads.assumingMemoryBound(to: Float.self), count: r + 1))
        }
        let alone = shared.clones.map(step)
        shared.slots = (0..<threads).map { _ in Slot() }
        DispatchQueue.concurrentPerform(iterations: threads) { t in
            let clone = shared.clones[t], slot = shared.slots[t]
            for round in 0..<rounds {
                slot.steps.append(step(clone) ?? [])
                // A failing call that names this thread's own index; another thread's failure
                // in between must not replace the message this thread reads.
                var bad = [Float](repeating: 0, count: r)
                bad[(t + round) % r] = .nan
                var scratch: OpaquePointer?
                _ = loldu_adapter_clone(&scratch, clone)  // the handle table under contention
                let status = loldu_set_z(clone, bad)
                loldu_adapter_free(scratch)
                slot.failures.append(status == LOLDU_ERR_NOT_FINITE ? String(cString: loldu_last_error()) : "status \(status)")
            }
        }
        for t in 0..<threads {
            let expected = try #require(alone[t], "clone \(t) alone")
            for (round, result) in shared.slots[t].steps.enumerated() {
                expectClose(result, expected, rtol: 1e-5, atol: 1e-6, "clone \(t), round \(round)")
            }
            for (round, message) in shared.slots[t].failures.enumerated() {
                #expect(message.contains("z[\((t + round) % r)]"), "thread \(t), round \(round): \(message)")
            }
        }
    }

    /// Compute calls on one adapter from several threads at once run one at a time (the
    /// adapter's lock): each result equals the same call made alone, although they share the
    /// adapter's work space (here on the factored path, with batch sizes that make it grow).
    @Test func oneAdapterFromManyThreads() throws {
        var random = TestRandom(61)
        let (m, n, r, threads, rounds) = (80, 64, 24, 4, 25)
        let a = try TestAdapter<Float>(m: m, n: n, weight: random.array(m * n)) { $0.rank = Int64(r) }
        a.z = random.array(r)
        a.setPath(LOLDU_PATH_FACTORED)
        let batches = [1, 7, 33, 64, 5, 48]
        let inputs = batches.map { b -> (x: [Float], dy: [Float]) in (random.array(b * n), random.array(b * m)) }
        /// y, dX and this call's dz, dσ of batch `i`; nil if a call failed.
        @Sendable func step(_ handle: SendableHandle, _ i: Int, _ x: [Float], _ dy: [Float]) -> [Float]? {
            let b = batches[i]
            var y = [Float](repeating: .nan, count: b * m), dx = [Float](repeating: .nan, count: b * n)
            var grads = [Float](repeating: .nan, count: r + 1)
            guard loldu_forward(handle.raw, Int64(b), x, &y, nil) == LOLDU_OK,
                  loldu_backward_into(handle.raw, Int64(b), x, dy, &dx, nil, &grads) == LOLDU_OK else { return nil }
            return y + dx + grads
        }
        let handle = SendableHandle(raw: a.handle)
        let alone = inputs.indices.map { step(handle, $0, inputs[$0].x, inputs[$0].dy) }
        final class Slot: @unchecked Sendable { var results: [[Float]?] = [] }  // one per thread
        let slots = (0..<threads).map { _ in Slot() }
        DispatchQueue.concurrentPerform(iterations: threads) { t in
            for round in 0..<rounds {
                let i = (t + round) % batches.count
                slots[t].results.append(step(handle, i, inputs[i].x, inputs[i].dy))
            }
        }
        for t in 0..<threads {
            for (round, result) in slots[t].results.enumerated() {
                let i = (t + round) % batches.count
                let expected = try #require(alone[i])
                let got = try #require(result, "thread \(t), round \(round): a call failed")
                expectClose(got, expected, rtol: 1e-5, atol: 1e-6, "thread \(t), round \(round), batch \(batches[i])")
            }
        }
    }

    /// The library's random inits, against an independent implementation of the documented
    /// generator (SplitMix64-seeded xoshiro256**, top 53 bits).
    @Test func randomInitsAreReproducible() throws {
        var random = TestRandom(53)
        let (m, n, r) = (40, 30, 30)
        let w: [Double] = random.array(m * n)
        func z<T: TestScalar>(_: T.Type, _ zInit: loldu_z_init, seed: UInt64) throws -> [T] {
            try TestAdapter<T>(m: m, n: n, weight: w.map { T($0) }) {
                $0.rank = Int64(r); $0.z_init = zInit.i32; $0.seed = seed
            }.z
        }
        for zInit in [LOLDU_INIT_UNIFORM, LOLDU_INIT_NORMAL, LOLDU_INIT_S_UNIFORM, LOLDU_INIT_S_NORMAL] {
            let first = try z(Double.self, zInit, seed: 1234)
            #expect(first == (try z(Double.self, zInit, seed: 1234)), "same seed, same z")
            #expect(first != (try z(Double.self, zInit, seed: 1235)), "another seed, another z")
            if zInit == LOLDU_INIT_S_UNIFORM || zInit == LOLDU_INIT_S_NORMAL {  // independent of D_r
                #expect(first.map { Float($0) } == (try z(Float.self, zInit, seed: 1234)), "float z is double z rounded")
            }
        }

        var state = ReferenceXoshiro(seed: 1234)
        let expected = (0..<r).map { _ in -1 + 2 * (Double(state.next() >> 11) * 0x1p-53) }
        #expect(try z(Double.self, LOLDU_INIT_S_UNIFORM, seed: 1234) == expected)

        let normal = try z(Double.self, LOLDU_INIT_S_NORMAL, seed: 9)
        var other = TestRandom(1)
        let big = try TestAdapter<Double>(m: 600, n: 500, weight: other.array(600 * 500)) {
            $0.rank = 500; $0.z_init = LOLDU_INIT_S_NORMAL.i32; $0.seed = 9
        }.z
        #expect(Array(big[0..<r]) == normal, "the stream does not depend on r")
        let mean: Double = big.reduce(0, +) / 500
        var variance = 0.0
        for v in big { variance += (v - mean) * (v - mean) }
        variance /= 499
        #expect(abs(mean) < 0.15 && abs(variance - 1) < 0.2, "N(0, 1): mean \(mean), variance \(variance)")

        let adapter = try TestAdapter<Double>(m: m, n: n, weight: w) { $0.rank = Int64(r); $0.z_init = LOLDU_INIT_CONSTANT.i32 }
        let d = adapter.factor(LOLDU_FACTOR_DIAG)
        let mu = d.reduce(0, +) / Double(r)
        expectClose(adapter.z, [Double](repeating: mu, count: r), rtol: 1e-14, atol: 1e-15, "constant init")
        let uniform = try z(Double.self, LOLDU_INIT_UNIFORM, seed: 5)
        #expect(uniform.allSatisfy { abs($0) <= abs(mu) / 2 })
        #expect(try z(Double.self, LOLDU_INIT_ONES, seed: 0) == [Double](repeating: 1, count: r))
        #expect(try z(Double.self, LOLDU_INIT_ZEROS, seed: 0) == [Double](repeating: 0, count: r))
        #expect(try z(Double.self, LOLDU_INIT_LU, seed: 0) == d)
    }

    @Test func configDefaultsAndInfo() throws {
        var config = loldu_config()
        #expect(loldu_config_default(&config) == LOLDU_OK)
        #expect(config.struct_size == UInt32(MemoryLayout<loldu_config>.size))
        #expect(config.rank == 0 && config.alpha == 0 && config.z_init == LOLDU_INIT_LU.i32)  // full rank
        #expect(config.residual == LOLDU_RESIDUAL_PIVOTS.i32 && config.train_sigma == 1)

        var random = TestRandom(59)
        let adapter = try TestAdapter<Float>(m: 12, n: 10, weight: random.array(120), bias: random.array(12))
        let info = adapter.info
        #expect(info.m == 12 && info.n == 10 && info.rank == 10 && info.dtype == LOLDU_FLOAT32.i32)
        #expect(info.alpha == 10 && info.sigma == 1 && info.num_trainable == 11 && info.has_bias == 1)
        #expect(info.enabled == 1 && info.merged == 0 && info.path == LOLDU_PATH_AUTO.i32)
        #expect(info.bytes_factors >= Int64(10 * (12 + 10) * 4) && info.bytes_merged == 0)

        // Rank 0 in a derived adapter's config: the shared factors' rank.
        let base = try TestAdapter<Float>(m: 12, n: 10, weight: adapter.weight) { $0.rank = 4 }
        var derived: OpaquePointer?
        #expect(loldu_adapter_derive(&derived, base.handle, &config) == LOLDU_OK)
        #expect(adapterInfo(derived!).rank == 4)
        loldu_adapter_free(derived)
    }

    @Test func borrowedWeightComputesLikeACopy() throws {
        var random = TestRandom(67)
        let (m, n, r, batch) = (10, 8, 4, 3)
        let w: [Float] = random.array(m * n), x: [Float] = random.array(batch * n), dy: [Float] = random.array(batch * m)
        let copied = try TestAdapter<Float>(m: m, n: n, weight: w) { $0.rank = Int64(r) }
        w.withUnsafeBufferPointer { wp in
            // TestAdapter keeps its own array; hand the library this buffer, alive for the scope.
            var config = loldu_config()
            _ = loldu_config_default(&config)
            config.rank = Int64(r)
            config.borrow_weight = 1
            var handle: OpaquePointer?
            #expect(loldu_adapter_create(&handle, LOLDU_FLOAT32, Int64(m), Int64(n), wp.baseAddress, nil, &config) == LOLDU_OK)
            defer { loldu_adapter_free(handle) }
            var info = loldu_adapter_info()
            #expect(loldu_adapter_get_info(handle, &info, MemoryLayout<loldu_adapter_info>.size) == LOLDU_OK)
            #expect(info.borrow_weight == 1 && info.bytes_weight == 0)
            // A derived adapter reports its base's borrowed W; one derived from a copying base
            // does not borrow, whatever its config said.
            var derived: OpaquePointer?, fromCopy: OpaquePointer?
            #expect(loldu_adapter_derive(&derived, handle, &config) == LOLDU_OK)
            #expect(loldu_adapter_derive(&fromCopy, copied.handle, &config) == LOLDU_OK)
            defer { loldu_adapter_free(derived); loldu_adapter_free(fromCopy) }
            #expect(adapterInfo(derived!).borrow_weight == 1 && adapterInfo(fromCopy!).borrow_weight == 0)
            #expect(copied.info.bytes_weight == Int64(m * n * 4))
            let z: [Float] = random.array(r)
            copied.z = z
            #expect(loldu_set_z(handle, z) == LOLDU_OK)
            var y = [Float](repeating: 0, count: batch * m), dx = [Float](repeating: 0, count: batch * n)
            #expect(loldu_forward(handle, Int64(batch), x, &y, nil) == LOLDU_OK)
            #expect(loldu_backward(handle, Int64(batch), x, dy, &dx, nil) == LOLDU_OK)
            #expect(y == copied.forward(x, batch: batch))
            #expect(dx == copied.backward(x, dy, batch: batch))
        }
    }

    /// Forward-only use (evaluation) on a shape whose training plan is factored caches W_eff
    /// once repeated forwards have paid for it, and recomputes it when z changes.
    @Test func repeatedForwardsCacheTheMergedWeight() throws {
        var random = TestRandom(71)
        let (m, n, r, batch) = (256, 256, 8, 4)
        let adapter = try TestAdapter<Double>(m: m, n: n, weight: random.array(m * n)) { $0.rank = Int64(r) }
        let reference = try TestAdapter<Double>(m: m, n: n, weight: adapter.weight) { $0.rank = Int64(r) }
        reference.setPath(LOLDU_PATH_FACTORED)
        var path = LOLDU_PATH_AUTO
        #expect(loldu_plan(adapter.handle, Int64(batch), 0, &path) == LOLDU_OK && path == LOLDU_PATH_FACTORED)
        let z: [Double] = random.array(r)
        adapter.z = z
        reference.z = z
        let x: [Double] = random.array(batch * n)
        // Rebuilding costs 2mnr; each factored forward 2Br(m + n): m / (2B) = 32 forwards.
        for call in 0..<40 {
            expectClose(adapter.forward(x, batch: batch), reference.forward(x, batch: batch), rtol: 1e-12, atol: 1e-12, "call \(call)")
            #expect((adapter.info.bytes_merged > 0) == (call >= 32), "call \(call): cached \(adapter.info.bytes_merged)")
        }
        adapter.z = z.map { $0 + 1 }
        reference.z = z.map { $0 + 1 }
        expectClose(adapter.forward(x, batch: batch), reference.forward(x, batch: batch), rtol: 1e-12, atol: 1e-12, "after z changed")
    }

    /// The degenerate-pivot test looks at the panel, not at the number of rows.
    @Test func tallWeightPivotsAreNotDegenerate() throws {
        let m = 100_000
        var w = [Float](repeating: 0, count: m * 2)
        for i in 0..<m { w[2 * i] = 1; w[2 * i + 1] = 0.5 }
        w[0] = 2
        let adapter = try TestAdapter<Float>(m: m, n: 2, weight: w) { $0.rank = 1 }
        #expect(adapter.info.degenerate_pivots == 0)
        #expect(adapter.factor(LOLDU_FACTOR_UPPER) == [1, 0.25])
    }

    @Test func planFollowsTheFlopCount() throws {
        // The shapes of docs/design.md's examples (weights need not be meaningful to plan).
        let cases: [(m: Int, n: Int, r: Int, batch: Int, keepsH: Int32, expected: loldu_path)] = [
            (768, 768, 64, 4096, 1, LOLDU_PATH_MERGED),
            (768, 768, 768, 4096, 0, LOLDU_PATH_MERGED_WGRAD),
            (768, 768, 768, 4096, 1, LOLDU_PATH_MERGED),  // a kept h costs 2Bnr that dz via dW never uses
            (1024, 1024, 64, 256, 1, LOLDU_PATH_FACTORED),
            (768, 768, 64, 8, 0, LOLDU_PATH_FACTORED),
        ]
        var random = TestRandom(61)
        for c in cases {
            let adapter = try TestAdapter<Float>(m: c.m, n: c.n, weight: random.array(c.m * c.n)) { $0.rank = Int64(c.r) }
            var path = loldu_path(rawValue: 99)
            #expect(loldu_plan(adapter.handle, Int64(c.batch), c.keepsH, &path) == LOLDU_OK)
            #expect(path == c.expected, "\(c)")
            adapter.setPath(LOLDU_PATH_FACTORED)
            #expect(loldu_plan(adapter.handle, Int64(c.batch), c.keepsH, &path) == LOLDU_OK)
            #expect(path == LOLDU_PATH_FACTORED, "a forced path is reported")
        }
    }

    @Test func versionAndThreads() {
        #expect(loldu_version_number() == UInt32(LOLDU_VERSION_MAJOR * 10000 + LOLDU_VERSION_MINOR * 100 + LOLDU_VERSION_PATCH))
        #expect(String(cString: loldu_version_string()) == LOLDU_VERSION_STRING)
        let threads = loldu_get_num_threads()
        #expect(threads >= 1)
        #expect(loldu_set_num_threads(1) == LOLDU_OK)
        #expect(loldu_get_num_threads() == 1)
        #expect(loldu_set_num_threads(threads) == LOLDU_OK)
        #expect(String(cString: loldu_status_string(Int32(LOLDU_ERR_SHAPE.rawValue))).contains("shape"))
        #expect(String(cString: loldu_status_string(12345)) == "unknown status")
    }

    /// `init_change` is ‖W_eff − W‖_F / ‖W‖_F at creation, measured here on the effective
    /// weight: zero for the `lu` init or the residual `init`, about the whole weight for the
    /// uniform init under σ = 1 with residual `pivots` (the combination the Python APIs warn of).
    @Test func initChangeMeasuresTheInitialMove() throws {
        var random = TestRandom(41)
        let (m, n) = (24, 20)
        let w: [Double] = random.array(m * n)
        func change(_ zInit: loldu_z_init, _ residual: loldu_residual) throws -> (reported: Double, measured: Double) {
            let a = try TestAdapter<Double>(m: m, n: n, weight: w) {
                $0.z_init = zInit.i32
                $0.residual = residual.i32
            }
            var effective = [Double](repeating: 0, count: m * n)
            #expect(loldu_effective_weight(a.handle, &effective) == LOLDU_OK)
            let difference = zip(effective, w).reduce(0) { $0 + ($1.0 - $1.1) * ($1.0 - $1.1) }
            let norm = w.reduce(0) { $0 + $1 * $1 }
            return (a.info.init_change, (difference / norm).squareRoot())
        }
        let uniform = try change(LOLDU_INIT_UNIFORM, LOLDU_RESIDUAL_PIVOTS)
        #expect(uniform.measured > 0.5, "the uniform init under sigma = 1 should move W a lot: \(uniform)")
        #expect(abs(uniform.reported - uniform.measured) <= 1e-6 * uniform.measured, "\(uniform)")
        for (zInit, residual) in [(LOLDU_INIT_LU, LOLDU_RESIDUAL_PIVOTS), (LOLDU_INIT_UNIFORM, LOLDU_RESIDUAL_INIT)] {
            let none = try change(zInit, residual)
            #expect(none.reported <= 1e-12 && none.measured <= 1e-12, "\(zInit) \(residual): \(none)")
        }
    }
}

/// xoshiro256** seeded by SplitMix64, written from the published algorithm.
struct ReferenceXoshiro {
    var s: [UInt64]
    init(seed: UInt64) {
        var split = TestRandom(seed)
        s = (0..<4).map { _ in split.next() }
    }
    mutating func next() -> UInt64 {
        func rotl(_ x: UInt64, _ k: UInt64) -> UInt64 { (x << k) | (x >> (64 - k)) }
        let result = rotl(s[1] &* 5, 7) &* 9
        let t = s[1] << 17
        s[2] ^= s[0]; s[3] ^= s[1]; s[1] ^= s[2]; s[0] ^= s[3]
        s[2] ^= t
        s[3] = rotl(s[3], 45)
        return result
    }
}
