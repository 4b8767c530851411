import CLoLDU
import Foundation
import Testing

/// Hostile files and hostile use: values at the integer limits inside files, FIFOs and devices
/// where files are expected, interrupted saves, steps that would leave non-finite values, and
/// refused calls that must leave every object as it was.
final class ResultBox<R>: @unchecked Sendable { var value: R? }

/// An opaque handle passed to another thread (the library's handles are thread-safe tokens).
struct SendableHandle: @unchecked Sendable { let raw: OpaquePointer? }

@Suite struct ReliabilityTests {
    // MARK: Helpers

    /// An adapter (float32 unless told, rank `rank`) and an AdamW optimiser over it.
    final class Training {
        let adapter: TestAdapter<Float>
        var optimizer: OpaquePointer?
        var config = loldu_optimizer_config()

        init(rank: Int = 3, edit: (inout loldu_optimizer_config) -> Void = { _ in }) throws {
            var random = TestRandom(131)
            adapter = try TestAdapter<Float>(m: 6, n: 5, weight: random.array(30)) { $0.rank = Int64(rank) }
            _ = loldu_optimizer_config_default(&config, LOLDU_ADAMW)
            edit(&config)
            let status = loldu_optimizer_create(&optimizer, &config, [adapter.handle], 1)
            guard status == LOLDU_OK else { throw LibraryError(status: status, message: String(cString: loldu_last_error())) }
        }

        deinit { loldu_optimizer_free(optimizer) }

        /// One forward, backward and step on fixed data.
        func step() -> loldu_status {
            var random = TestRandom(7)
            let x: [Float] = random.array(4 * 5)
            let y = adapter.forward(x, batch: 4)
            adapter.backward(x, y, batch: 4)
            return loldu_optimizer_step(optimizer, nil)
        }

        /// Saves the optimiser's state as `directory/state.safetensors`; returns the path.
        func saved(in directory: String) -> String {
            let path = directory + "/state.safetensors"
            #expect(loldu_optimizer_save(optimizer, path) == LOLDU_OK)
            return path
        }

        var steps: Int64 {
            var steps: Int64 = -1
            _ = loldu_optimizer_get_step(optimizer, &steps)
            return steps
        }
    }

    /// Replaces one `__metadata__` value of a safetensors file.
    static func rewriteMetadata(_ path: String, _ key: String, _ value: String) throws {
        let bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: path)))
        let edited = CheckpointTests.rewriteHeader(bytes) { header in
            let pattern = try! NSRegularExpression(pattern: "\"\(NSRegularExpression.escapedPattern(for: key))\":\"[^\"]*\"")
            return pattern.stringByReplacingMatches(in: header, range: NSRange(header.startIndex..., in: header),
                                                    withTemplate: "\"\(key)\":\"\(value)\"")
        }
        try Data(edited).write(to: URL(fileURLWithPath: path))
    }

    /// Runs `body` on another thread; `nil` if it has not returned within `seconds` (a hang).
    static func within<R: Sendable>(_ seconds: Double, _ body: @escaping @Sendable () -> R) -> R? {
        let box = ResultBox<R>(), done = DispatchSemaphore(value: 0)
        Thread { box.value = body(); done.signal() }.start()
        return done.wait(timeout: .now() + seconds) == .success ? box.value : nil
    }

    static func lastError() -> String { String(cString: loldu_last_error()) }

    // MARK: 1. Counts and sizes inside files

    static let limits: [(key: String, value: String)] = [
        ("steps", "9223372036854775807"), ("steps", "-9223372036854775808"), ("steps", "9223372036854775808"),
        ("steps", "9007199254740993"), ("steps", "-1"), ("steps", "1e3"), ("steps", " 5"),
        ("warmup_steps", "9223372036854775807"), ("total_steps", "-9223372036854775808"),
        ("adapter.0.rank", "9223372036854775807"), ("adapters", "9223372036854775807"),
    ]

    @Test(arguments: limits)
    func integersAtTheLimitsInAnOptimizerFileAreRefused(_ limit: (key: String, value: String)) throws {
        let directory = try temporaryDirectory()
        let t = try Training()
        #expect(t.step() == LOLDU_OK)
        let path = t.saved(in: directory)
        try Self.rewriteMetadata(path, limit.key, limit.value)
        let z = t.adapter.z
        let status = loldu_optimizer_load(t.optimizer, path)
        #expect(status == LOLDU_ERR_FORMAT || status == LOLDU_ERR_MISMATCH, "\(limit): \(status.rawValue) \(Self.lastError())")
        #expect(Self.lastError().contains(limit.key.split(separator: ".").last.map(String.init) ?? limit.key), "\(Self.lastError())")
        // Nothing changed, and training goes on.
        #expect(t.steps == 1 && t.adapter.z == z)
        #expect(t.step() == LOLDU_OK && t.steps == 2)
    }

    /// The largest step count a file may hold loads, and the next step is refused (no trap).
    @Test func theLastCountableStepIsRefusedNotTrapped() throws {
        let directory = try temporaryDirectory()
        let t = try Training()
        let path = t.saved(in: directory)
        try Self.rewriteMetadata(path, "steps", "9007199254740992")
        #expect(loldu_optimizer_load(t.optimizer, path) == LOLDU_OK, "\(Self.lastError())")
        #expect(t.steps == 9_007_199_254_740_992)
        let z = t.adapter.z
        #expect(t.step() == LOLDU_ERR_STATE)
        #expect(t.adapter.z == z && t.steps == 9_007_199_254_740_992)
        var limits = loldu_optimizer_config()
        _ = loldu_optimizer_config_default(&limits, LOLDU_ADAMW)
        limits.total_steps = Int64.max
        limits.schedule = LOLDU_SCHEDULE_LINEAR.i32
        var optimizer: OpaquePointer?
        #expect(loldu_optimizer_create(&optimizer, &limits, [t.adapter.handle], 1) == LOLDU_ERR_INVALID_ARGUMENT)
        #expect(Self.lastError().contains("total_steps"))
    }

    /// A negative second moment (AdamW's running mean of squares) in an optimiser file is refused
    /// at load, naming the tensor, instead of failing every later step.
    @Test func aNegativeSecondMomentIsRefused() throws {
        let directory = try temporaryDirectory()
        let t = try Training()
        #expect(t.step() == LOLDU_OK)
        let path = t.saved(in: directory)
        var bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: path)))
        let (header, dataStart) = try CheckpointTests.header(bytes)
        let entry = header["adapter.0.exp_avg_sq"] as! [String: Any]
        #expect(entry["dtype"] as? String == "F32")
        let begin = dataStart + (entry["data_offsets"] as! [Int])[0] + 4  // its second element
        withUnsafeBytes(of: Float(-1).bitPattern.littleEndian) { bytes.replaceSubrange(begin..<(begin + 4), with: $0) }
        try Data(bytes).write(to: URL(fileURLWithPath: path))
        let z = t.adapter.z
        #expect(loldu_optimizer_load(t.optimizer, path) == LOLDU_ERR_FORMAT)
        #expect(Self.lastError().contains("exp_avg_sq\" element 1 is -1"), "\(Self.lastError())")
        #expect(t.steps == 1 && t.adapter.z == z)
        #expect(t.step() == LOLDU_OK && t.steps == 2)
    }

    // MARK: 2. Special files

    @Test func fifosDevicesAndDirectoriesAreRefusedWithoutBlocking() throws {
        let directory = try temporaryDirectory()
        let t = try Training()
        let good = directory + "/good"
        let saved = withCStrings(["layer"]) { loldu_checkpoint_save(good, [t.adapter.handle], $0, 1) }
        #expect(saved == LOLDU_OK)
        for file in ["adapter_config.json", "adapter_model.safetensors"] {
            let dir = directory + "/fifo-" + file
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: false)
            for other in ["adapter_config.json", "adapter_model.safetensors"] where other != file {
                try FileManager.default.copyItem(atPath: good + "/" + other, toPath: dir + "/" + other)
            }
            #expect(mkfifo(dir + "/" + file, 0o644) == 0)
            let status = Self.within(10) { () -> (loldu_status, String) in
                var checkpoint: OpaquePointer?
                let s = loldu_checkpoint_open(&checkpoint, dir)
                loldu_checkpoint_free(checkpoint)
                return (s, Self.lastError())
            }
            #expect(status != nil, "loldu_checkpoint_open blocked on a FIFO \(file)")
            #expect(status?.0 == LOLDU_ERR_IO && status?.1.contains("FIFO") == true, "\(file): \(String(describing: status))")
        }
        let fifo = directory + "/state.fifo"
        #expect(mkfifo(fifo, 0o644) == 0)
        let optimizer = SendableHandle(raw: t.optimizer)
        for (path, what) in [(fifo, "FIFO"), ("/dev/null", "character device"), (directory, "directory")] {
            let load = Self.within(10) { () -> (loldu_status, String) in (loldu_optimizer_load(optimizer.raw, path), Self.lastError()) }
            #expect(load != nil, "loldu_optimizer_load blocked on \(path)")
            #expect(load?.0 == LOLDU_ERR_IO && load?.1.contains(what) == true, "\(path): \(String(describing: load))")
        }
        // Saving over a FIFO or a directory: refused, and the FIFO is still a FIFO.
        for (path, what) in [(fifo, "FIFO"), (good, "directory")] {
            let save = Self.within(10) { () -> (loldu_status, String) in (loldu_optimizer_save(optimizer.raw, path), Self.lastError()) }
            #expect(save?.0 == LOLDU_ERR_IO && save?.1.contains(what) == true, "\(path): \(String(describing: save))")
        }
        var info = stat()
        #expect(lstat(fifo, &info) == 0 && (info.st_mode & S_IFMT) == S_IFIFO)
        // A checkpoint "directory" that is a FIFO.
        let intoFifo = withCStrings(["layer"]) { loldu_checkpoint_save(fifo, [t.adapter.handle], $0, 1) }
        #expect(intoFifo == LOLDU_ERR_IO && Self.lastError().contains("not a directory"), "\(Self.lastError())")
        var checkpoint: OpaquePointer?
        #expect(loldu_checkpoint_open(&checkpoint, fifo) == LOLDU_ERR_IO)
        // A regular file where a directory is expected is called one.
        let file = directory + "/plain"
        #expect(FileManager.default.createFile(atPath: file, contents: Data("x".utf8)))
        #expect(loldu_checkpoint_open(&checkpoint, file) == LOLDU_ERR_IO)
        #expect(Self.lastError().contains("is a regular file, not a directory"), "\(Self.lastError())")
    }

    /// A symbolic link where a file is written is followed, to an existing target or to one
    /// that does not exist yet (which is created, as open(O_CREAT) does); the link stays a link.
    @Test func symbolicLinksAreFollowedEvenWhenDangling() throws {
        let directory = try temporaryDirectory()
        let t = try Training()
        try FileManager.default.createDirectory(atPath: directory + "/real", withIntermediateDirectories: false)
        let existing = directory + "/real/existing.st", dangling = directory + "/real/later.st"
        #expect(loldu_optimizer_save(t.optimizer, existing) == LOLDU_OK)
        for (link, target) in [("to-existing", "real/existing.st"), ("dangling", "real/later.st"),
                               ("chain", "dangling")] {
            #expect(symlink(target, directory + "/" + link) == 0)
        }
        for link in ["to-existing", "chain"] {
            #expect(loldu_optimizer_save(t.optimizer, directory + "/" + link) == LOLDU_OK, "\(Self.lastError())")
        }
        for link in ["to-existing", "dangling", "chain"] {
            var info = stat()
            #expect(lstat(directory + "/" + link, &info) == 0 && (info.st_mode & S_IFMT) == S_IFLNK, "\(link) is still a link")
        }
        for target in [existing, dangling] {
            var info = stat()
            #expect(lstat(target, &info) == 0 && (info.st_mode & S_IFMT) == S_IFREG, "\(target) was written")
            #expect(loldu_optimizer_load(t.optimizer, target) == LOLDU_OK, "\(Self.lastError())")
        }
        #expect(symlink("loop-b", directory + "/loop-a") == 0 && symlink("loop-a", directory + "/loop-b") == 0)
        #expect(loldu_optimizer_save(t.optimizer, directory + "/loop-a") == LOLDU_ERR_IO)
        // A target that is not UTF-8 (which a path given as a C string could not name back): refused.
        let latin1: [CChar] = Array("caf".utf8CString.dropLast()) + [CChar(bitPattern: 0xE9)] + Array(".st".utf8CString)
        #expect(symlink(latin1, directory + "/odd") == 0)
        #expect(loldu_optimizer_save(t.optimizer, directory + "/odd") == LOLDU_ERR_IO && Self.lastError().contains("UTF-8"),
                "\(Self.lastError())")
    }

    // MARK: 3. Interrupted saves

    /// Two versions with different layer sets; returns their directories.
    static func twoVersions(in directory: String) throws -> (old: String, new: String, adapters: [TestAdapter<Float>]) {
        var random = TestRandom(17)
        let adapters = try (0..<3).map { _ in try TestAdapter<Float>(m: 7, n: 6, weight: random.array(42)) { $0.rank = 4 } }
        for a in adapters { a.z = random.array(4) }
        let old = directory + "/old", new = directory + "/new"
        #expect(withCStrings(["a", "b"]) { loldu_checkpoint_save(old, [adapters[0].handle, adapters[1].handle], $0, 2) } == LOLDU_OK)
        #expect(withCStrings(["a", "c"]) { loldu_checkpoint_save(new, [adapters[0].handle, adapters[2].handle], $0, 2) } == LOLDU_OK)
        return (old, new, adapters)
    }

    static func layerNames(_ directory: String) -> (loldu_status, [String]) {
        var checkpoint: OpaquePointer?
        let status = loldu_checkpoint_open(&checkpoint, directory)
        defer { loldu_checkpoint_free(checkpoint) }
        guard status == LOLDU_OK else { return (status, []) }
        var count = 0
        _ = loldu_checkpoint_count(checkpoint, &count)
        return (status, (0..<count).map { i in
            var name: UnsafePointer<CChar>?
            _ = loldu_checkpoint_name(checkpoint, i, &name)
            return String(cString: name!)
        })
    }

    /// Every state an interrupted save can leave loads as exactly the old or the new checkpoint,
    /// and the next save cleans up what it left.
    @Test func everyInterruptedSaveStateLoadsAsOldOrNew() throws {
        let directory = try temporaryDirectory()
        let (old, new, adapters) = try Self.twoVersions(in: directory)
        let fm = FileManager.default
        let (model, config, pending) = ("adapter_model.safetensors", "adapter_config.json", ".adapter_config.json.pending")
        // (model from, config from, pending from) → expected layers; nil: no such file.
        let states: [(String?, String?, String?, [String]?)] = [
            (old, old, nil, ["a", "b"]),   // before the save's renames
            (old, old, new, ["a", "b"]),   // pending written, model not yet renamed
            (new, old, new, ["a", "c"]),   // model renamed, config not yet
            (new, nil, new, ["a", "c"]),   // the first save into an empty directory, same point
            (nil, nil, new, nil),          // the first save, before its model rename: nothing yet
            (new, old, nil, nil),          // a torn pair that no save of this library leaves
        ]
        for (i, state) in states.enumerated() {
            let dir = directory + "/state\(i)"
            try fm.createDirectory(atPath: dir, withIntermediateDirectories: false)
            for (from, file) in [(state.0, model), (state.1, config)] where from != nil {
                try fm.copyItem(atPath: from! + "/" + file, toPath: dir + "/" + file)
            }
            if let from = state.2 { try fm.copyItem(atPath: from + "/" + config, toPath: dir + "/" + pending) }
            let (status, names) = Self.layerNames(dir)
            if let expected = state.3 {
                #expect(status == LOLDU_OK && names == expected, "state \(i): \(status.rawValue) \(names) \(Self.lastError())")
            } else {
                #expect(status != LOLDU_OK, "state \(i) should not load")
            }
            // The next save finishes or discards the interrupted one and removes stale files.
            try Data("partial".utf8).write(to: URL(fileURLWithPath: dir + "/.adapter_model.safetensors.loldu-Ab12Yz"))
            try Data("partial".utf8).write(to: URL(fileURLWithPath: dir + "/.adapter_config.json.loldu-q9W0xk"))
            #expect(withCStrings(["b"]) { loldu_checkpoint_save(dir, [adapters[1].handle], $0, 1) } == LOLDU_OK)
            #expect(Set(try fm.contentsOfDirectory(atPath: dir)) == [model, config], "state \(i): leftovers")
            #expect(Self.layerNames(dir).1 == ["b"])
        }
    }

    // MARK: 4. Non-finite values

    @Test func stepsThatWouldLeaveNonFiniteValuesChangeNothing() throws {
        let directory = try temporaryDirectory()
        #expect(throws: LibraryError.self) { _ = try Training { $0.eps = 0 } }
        #expect(Self.lastError().contains("eps"))
        let settings: [(String, (inout loldu_optimizer_config) -> Void)] = [
            ("SGD lr 1e30", { $0.kind = Int32(LOLDU_SGD.rawValue); $0.lr = 1e30; $0.weight_decay = 0 }),
            ("SGD momentum lr 1e36", { $0.kind = Int32(LOLDU_SGD.rawValue); $0.lr = 1e36; $0.momentum = 0.9; $0.weight_decay = 0 }),
            ("AdamW lr 3e38", { $0.lr = 3e38 }),
        ]
        for (what, edit) in settings {
            let t = try Training(edit: edit)
            var finite = true
            for _ in 0..<3 where finite {
                let before = (z: t.adapter.z, sigma: t.adapter.sigma, steps: t.steps)
                let statePath = directory + "/before.safetensors", afterPath = directory + "/after.safetensors"
                #expect(loldu_optimizer_save(t.optimizer, statePath) == LOLDU_OK)
                var random = TestRandom(7)
                let x: [Float] = random.array(20)
                t.adapter.backward(x, t.adapter.forward(x, batch: 4), batch: 4)
                let grads = t.adapter.grads
                let status = loldu_optimizer_step(t.optimizer, nil)
                if status == LOLDU_OK { continue }
                finite = false
                #expect(status == LOLDU_ERR_NOT_FINITE, "\(what): \(status.rawValue)")
                #expect(Self.lastError().contains("adapters[0]") && Self.lastError().contains("not finite"), "\(Self.lastError())")
                #expect(t.adapter.z == before.z && t.adapter.sigma == before.sigma && t.steps == before.steps, "\(what): changed")
                #expect(t.adapter.grads == grads, "\(what): gradients changed")
                #expect(loldu_optimizer_save(t.optimizer, afterPath) == LOLDU_OK)
                #expect(try Data(contentsOf: URL(fileURLWithPath: statePath)) == Data(contentsOf: URL(fileURLWithPath: afterPath)),
                        "\(what): optimiser state changed")
            }
            #expect(!finite, "\(what): every step stayed finite")
            #expect(t.adapter.z.allSatisfy { $0.isFinite })
        }
    }

    @Test func saveRefusesNonFiniteParametersAndKeepsThePreviousCheckpoint() throws {
        let directory = try temporaryDirectory()
        let t = try Training()
        let dir = directory + "/ckpt"
        #expect(withCStrings(["encoder.q"]) { loldu_checkpoint_save(dir, [t.adapter.handle], $0, 1) } == LOLDU_OK)
        let before = try FileManager.default.contentsOfDirectory(atPath: dir).sorted().map {
            try Data(contentsOf: URL(fileURLWithPath: dir + "/" + $0))
        }
        var params: UnsafeMutableRawPointer?
        _ = loldu_params(t.adapter.handle, &params, nil)
        for (index, value) in [(1, Float.infinity), (3, Float.nan)] {  // index 3 is σ (rank 3)
            let p = params!.assumingMemoryBound(to: Float.self)
            let saved = p[index]
            p[index] = value
            #expect(withCStrings(["encoder.q"]) { loldu_checkpoint_save(dir, [t.adapter.handle], $0, 1) } == LOLDU_ERR_NOT_FINITE)
            #expect(Self.lastError().contains("encoder.q") && Self.lastError().contains(index == 3 ? "sigma" : "z[1]"), "\(Self.lastError())")
            p[index] = saved
        }
        let after = try FileManager.default.contentsOfDirectory(atPath: dir).sorted().map {
            try Data(contentsOf: URL(fileURLWithPath: dir + "/" + $0))
        }
        #expect(before == after)
    }

    // MARK: 6. A refused apply changes nothing

    @Test func refusedApplyLeavesTheAdapterUnchanged() throws {
        let directory = try temporaryDirectory()
        var random = TestRandom(3)
        let w: [Float] = random.array(20)
        let source = try TestAdapter<Float>(m: 5, n: 4, weight: w) { $0.rank = 2 }
        source.z = [3e38, 1]
        let dir = directory + "/ckpt"
        #expect(withCStrings(["l"]) { loldu_checkpoint_save(dir, [source.handle], $0, 1) } == LOLDU_OK)
        // Rewrite σ = 1 to σ = 2 in the file: z = 3e38 with σ = 2 overflows float32.
        let path = dir + "/adapter_model.safetensors"
        var bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: path)))
        let one = withUnsafeBytes(of: Float(1).bitPattern.littleEndian, Array.init)
        let two = withUnsafeBytes(of: Float(2).bitPattern.littleEndian, Array.init)
        let headerEnd = 8 + Int(bytes[0..<8].enumerated().reduce(UInt64(0)) { $0 | UInt64($1.element) << (8 * UInt64($1.offset)) })
        let header = String(decoding: bytes[8..<headerEnd], as: UTF8.self)
        let sigmaAt = try #require(header.range(of: #""l.loldu_sigma":\{[^}]*"data_offsets":\[(\d+)"#, options: .regularExpression))
        let offset = Int(header[sigmaAt].split(separator: "[").last!)!
        #expect(Array(bytes[(headerEnd + offset)..<(headerEnd + offset + 4)]) == one)
        bytes.replaceSubrange((headerEnd + offset)..<(headerEnd + offset + 4), with: two)
        try Data(bytes).write(to: URL(fileURLWithPath: path))

        let target = try TestAdapter<Float>(m: 5, n: 4, weight: w) { $0.rank = 2 }
        let (z, sigma) = (target.z, target.sigma)
        var checkpoint: OpaquePointer?
        #expect(loldu_checkpoint_open(&checkpoint, dir) == LOLDU_OK)
        defer { loldu_checkpoint_free(checkpoint) }
        #expect(loldu_checkpoint_apply(checkpoint, "l", target.handle) == LOLDU_ERR_NOT_FINITE)
        #expect(target.z == z && target.sigma == sigma, "a refused apply changed z or sigma")
    }

    // MARK: 7. Another rank or dtype is a mismatch

    @Test func optimizerStateOfAnotherRankOrDtypeIsAMismatch() throws {
        let directory = try temporaryDirectory()
        let path = directory + "/state.safetensors"
        let rank4 = try Training(rank: 4)
        #expect(rank4.step() == LOLDU_OK)
        #expect(loldu_optimizer_save(rank4.optimizer, path) == LOLDU_OK)
        let rank3 = try Training(rank: 3)
        #expect(loldu_optimizer_load(rank3.optimizer, path) == LOLDU_ERR_MISMATCH)
        #expect(Self.lastError().contains("rank 4") && Self.lastError().contains("rank 3"), "\(Self.lastError())")

        var random = TestRandom(5)
        let double = try TestAdapter<Double>(m: 6, n: 5, weight: random.array(30)) { $0.rank = 4 }
        var config = rank4.config
        var optimizer: OpaquePointer?
        #expect(loldu_optimizer_create(&optimizer, &config, [double.handle], 1) == LOLDU_OK)
        defer { loldu_optimizer_free(optimizer) }
        #expect(loldu_optimizer_load(optimizer, path) == LOLDU_ERR_MISMATCH)
        #expect(Self.lastError().contains("float32") && Self.lastError().contains("float64"), "\(Self.lastError())")
        // An older file without the rank and dtype keys: the tensors tell.
        try Self.rewriteMetadata(path, "adapter.0.rank", "")
        #expect(loldu_optimizer_load(rank3.optimizer, path) == LOLDU_ERR_MISMATCH)
        #expect(Self.lastError().contains("rank 4"), "\(Self.lastError())")
    }
}
