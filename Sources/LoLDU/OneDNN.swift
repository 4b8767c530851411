import CDNNL
import Glibc

/// oneDNN (Debian's `libdnnl.so.2`, 2.6): bfloat16 GEMMs on the CPU's bf16 units (AMX, AVX512-BF16)
/// and float32 GEMMs for CPUs whose OpenBLAS kernels were mis-detected.
///
/// Loaded with `dlopen` on first use, so that libloldu works (float32 and float64 on OpenBLAS,
/// bfloat16 widened to float32) where it is not installed, and so that its OpenMP runtime can be
/// told to wait passively before it starts: unless the process already runs an OpenMP runtime
/// (PyTorch's, which oneDNN then shares) or the caller set `OMP_WAIT_POLICY`, idle OpenMP
/// threads would spin and take the cores from the caller's threads. The environment is restored
/// after loading.
///
/// A GEMM runs through a matmul primitive created once per shape (cached, least recently used
/// first out past ``cacheLimit``), executed with its own memory objects, a per-thread stream and a
/// per-thread scratchpad, so that one primitive serves several threads at once.
enum OneDNN {
    // MARK: The C functions, looked up once

    typealias MemoryDescInit = @convention(c) (UnsafeMutablePointer<dnnl_memory_desc_t>?, Int32, UnsafePointer<dnnl_dim_t>?, dnnl_data_type_t, UnsafePointer<dnnl_dim_t>?) -> dnnl_status_t
    typealias MatmulDescInit = @convention(c) (UnsafeMutablePointer<dnnl_matmul_desc_t>?, UnsafePointer<dnnl_memory_desc_t>?, UnsafePointer<dnnl_memory_desc_t>?, UnsafePointer<dnnl_memory_desc_t>?, UnsafePointer<dnnl_memory_desc_t>?) -> dnnl_status_t
    typealias AttrCreate = @convention(c) (UnsafeMutablePointer<dnnl_primitive_attr_t?>?) -> dnnl_status_t
    typealias AttrDestroy = @convention(c) (dnnl_primitive_attr_t?) -> dnnl_status_t
    typealias AttrScratchpad = @convention(c) (dnnl_primitive_attr_t?, dnnl_scratchpad_mode_t) -> dnnl_status_t
    typealias AttrPostOps = @convention(c) (dnnl_primitive_attr_t?, const_dnnl_post_ops_t?) -> dnnl_status_t
    typealias PostOpsCreate = @convention(c) (UnsafeMutablePointer<dnnl_post_ops_t?>?) -> dnnl_status_t
    typealias PostOpsDestroy = @convention(c) (dnnl_post_ops_t?) -> dnnl_status_t
    typealias PostOpsSum = @convention(c) (dnnl_post_ops_t?, Float) -> dnnl_status_t
    typealias PDCreate = @convention(c) (UnsafeMutablePointer<dnnl_primitive_desc_t?>?, const_dnnl_op_desc_t?, const_dnnl_primitive_attr_t?, dnnl_engine_t?, const_dnnl_primitive_desc_t?) -> dnnl_status_t
    typealias PDDestroy = @convention(c) (dnnl_primitive_desc_t?) -> dnnl_status_t
    typealias PDQuery = @convention(c) (const_dnnl_primitive_desc_t?, dnnl_query_t, Int32, UnsafeMutableRawPointer?) -> dnnl_status_t
    typealias PDQueryMD = @convention(c) (const_dnnl_primitive_desc_t?, dnnl_query_t, Int32) -> UnsafePointer<dnnl_memory_desc_t>?
    typealias MDSize = @convention(c) (UnsafePointer<dnnl_memory_desc_t>?) -> Int
    typealias PrimitiveCreate = @convention(c) (UnsafeMutablePointer<dnnl_primitive_t?>?, const_dnnl_primitive_desc_t?) -> dnnl_status_t
    typealias PrimitiveDestroy = @convention(c) (dnnl_primitive_t?) -> dnnl_status_t
    typealias PrimitiveExecute = @convention(c) (const_dnnl_primitive_t?, dnnl_stream_t?, Int32, UnsafePointer<dnnl_exec_arg_t>?) -> dnnl_status_t
    typealias MemoryCreate = @convention(c) (UnsafeMutablePointer<dnnl_memory_t?>?, UnsafePointer<dnnl_memory_desc_t>?, dnnl_engine_t?, UnsafeMutableRawPointer?) -> dnnl_status_t
    typealias MemoryDestroy = @convention(c) (dnnl_memory_t?) -> dnnl_status_t
    typealias EngineCreate = @convention(c) (UnsafeMutablePointer<dnnl_engine_t?>?, dnnl_engine_kind_t, Int) -> dnnl_status_t
    typealias StreamCreate = @convention(c) (UnsafeMutablePointer<dnnl_stream_t?>?, dnnl_engine_t?, UInt32) -> dnnl_status_t
    typealias StreamDestroy = @convention(c) (dnnl_stream_t?) -> dnnl_status_t
    typealias EffectiveISA = @convention(c) () -> dnnl_cpu_isa_t
    typealias Version = @convention(c) () -> UnsafePointer<dnnl_version_t>?
    typealias SetThreads = @convention(c) (Int32) -> Void
    typealias GetThreads = @convention(c) () -> Int32

    struct API: @unchecked Sendable {
        let memoryDescInit: MemoryDescInit, matmulDescInit: MatmulDescInit
        let attrCreate: AttrCreate, attrDestroy: AttrDestroy, attrScratchpad: AttrScratchpad, attrPostOps: AttrPostOps
        let postOpsCreate: PostOpsCreate, postOpsDestroy: PostOpsDestroy, postOpsSum: PostOpsSum
        let pdCreate: PDCreate, pdDestroy: PDDestroy, pdQuery: PDQuery, pdQueryMD: PDQueryMD, mdSize: MDSize
        let primitiveCreate: PrimitiveCreate, primitiveDestroy: PrimitiveDestroy, execute: PrimitiveExecute
        let memoryCreate: MemoryCreate, memoryDestroy: MemoryDestroy
        let streamCreate: StreamCreate, streamDestroy: StreamDestroy
        let engine: dnnl_engine_t
        let isa: dnnl_cpu_isa_t
        let version: String
        /// OpenMP's thread count of the calling thread (oneDNN runs on OpenMP).
        let setThreads: SetThreads?, getThreads: GetThreads?
        /// Whether another library (PyTorch) loaded OpenMP first: its threads may have started.
        let sharedRuntime: Bool
        /// ``ProcessMutex/forks`` when oneDNN was loaded (more: a child of fork()).
        let forksAtLoad: UInt32
    }

    /// The loaded library, or `nil` when it cannot be loaded (then nothing here is used).
    static let api: API? = load()

    private static func load() -> API? {
        ProcessMutex.watchForks()
        // OpenMP threads that wait passively unless an OpenMP runtime already runs in the
        // process or the caller chose; restored right after loading.
        let gompRunning = dlopen("libgomp.so.1", RTLD_NOW | RTLD_NOLOAD).map { dlclose($0); return true } ?? false
        let setPolicy = !gompRunning && getenv("OMP_WAIT_POLICY") == nil
        if setPolicy { setenv("OMP_WAIT_POLICY", "PASSIVE", 0) }
        let handle = dlopen("libdnnl.so.2", RTLD_NOW | RTLD_LOCAL)
        if setPolicy { unsetenv("OMP_WAIT_POLICY") }
        guard let handle else { return nil }
        func symbol<F>(_ name: String, _: F.Type) -> F? {
            dlsym(handle, name).map { unsafeBitCast($0, to: F.self) }
        }
        let gomp = dlopen("libgomp.so.1", RTLD_NOW | RTLD_NOLOAD)
        guard let memoryDescInit = symbol("dnnl_memory_desc_init_by_strides", MemoryDescInit.self),
              let matmulDescInit = symbol("dnnl_matmul_desc_init", MatmulDescInit.self),
              let attrCreate = symbol("dnnl_primitive_attr_create", AttrCreate.self),
              let attrDestroy = symbol("dnnl_primitive_attr_destroy", AttrDestroy.self),
              let attrScratchpad = symbol("dnnl_primitive_attr_set_scratchpad_mode", AttrScratchpad.self),
              let attrPostOps = symbol("dnnl_primitive_attr_set_post_ops", AttrPostOps.self),
              let postOpsCreate = symbol("dnnl_post_ops_create", PostOpsCreate.self),
              let postOpsDestroy = symbol("dnnl_post_ops_destroy", PostOpsDestroy.self),
              let postOpsSum = symbol("dnnl_post_ops_append_sum", PostOpsSum.self),
              let pdCreate = symbol("dnnl_primitive_desc_create", PDCreate.self),
              let pdDestroy = symbol("dnnl_primitive_desc_destroy", PDDestroy.self),
              let pdQuery = symbol("dnnl_primitive_desc_query", PDQuery.self),
              let pdQueryMD = symbol("dnnl_primitive_desc_query_md", PDQueryMD.self),
              let mdSize = symbol("dnnl_memory_desc_get_size", MDSize.self),
              let primitiveCreate = symbol("dnnl_primitive_create", PrimitiveCreate.self),
              let primitiveDestroy = symbol("dnnl_primitive_destroy", PrimitiveDestroy.self),
              let execute = symbol("dnnl_primitive_execute", PrimitiveExecute.self),
              let memoryCreate = symbol("dnnl_memory_create", MemoryCreate.self),
              let memoryDestroy = symbol("dnnl_memory_destroy", MemoryDestroy.self),
              let engineCreate = symbol("dnnl_engine_create", EngineCreate.self),
              let streamCreate = symbol("dnnl_stream_create", StreamCreate.self),
              let streamDestroy = symbol("dnnl_stream_destroy", StreamDestroy.self),
              let effectiveISA = symbol("dnnl_get_effective_cpu_isa", EffectiveISA.self),
              let version = symbol("dnnl_version", Version.self)
        else { return nil }
        var engine: dnnl_engine_t?
        guard engineCreate(&engine, dnnl_cpu, 0) == dnnl_success, let engine else { return nil }
        let v = version()?.pointee
        return API(
            memoryDescInit: memoryDescInit, matmulDescInit: matmulDescInit, attrCreate: attrCreate,
            attrDestroy: attrDestroy, attrScratchpad: attrScratchpad, attrPostOps: attrPostOps,
            postOpsCreate: postOpsCreate, postOpsDestroy: postOpsDestroy, postOpsSum: postOpsSum,
            pdCreate: pdCreate, pdDestroy: pdDestroy, pdQuery: pdQuery, pdQueryMD: pdQueryMD, mdSize: mdSize,
            primitiveCreate: primitiveCreate, primitiveDestroy: primitiveDestroy, execute: execute,
            memoryCreate: memoryCreate, memoryDestroy: memoryDestroy, streamCreate: streamCreate,
            streamDestroy: streamDestroy, engine: engine, isa: effectiveISA(),
            version: v.map { "oneDNN \($0.major).\($0.minor).\($0.patch)" } ?? "oneDNN",
            setThreads: gomp.flatMap { dlsym($0, "omp_set_num_threads") }.map { unsafeBitCast($0, to: SetThreads.self) },
            getThreads: gomp.flatMap { dlsym($0, "omp_get_max_threads") }.map { unsafeBitCast($0, to: GetThreads.self) },
            sharedRuntime: gompRunning, forksAtLoad: ProcessMutex.forks.load(ordering: .relaxed))
    }

    // MARK: What this CPU gets

    /// Whether the CPU has bf16 dot-product instructions oneDNN uses (AVX512-BF16, AMX-BF16).
    /// Without them oneDNN emulates bf16, slower than converting to float32.
    static var hasNativeBFloat16: Bool { dispatches(dnnl_cpu_isa_avx512_core_bf16) }

    /// Whether oneDNN runs bf16 products on AMX tiles (several times float32's speed).
    static var hasAMX: Bool { dispatches(dnnl_cpu_isa_avx512_core_amx) }

    /// Whether the instruction set oneDNN dispatches to includes `isa` (its bits are a superset).
    private static func dispatches(_ isa: dnnl_cpu_isa_t) -> Bool {
        guard let effective = api?.isa.rawValue else { return false }
        return effective & isa.rawValue == isa.rawValue
    }

    /// The instruction set oneDNN dispatches to, for reports.
    static var isaName: String {
        guard let isa = api?.isa else { return "none" }
        switch isa {
        case dnnl_cpu_isa_avx512_core_amx: return "avx512_core_amx"
        case dnnl_cpu_isa_avx512_core_bf16: return "avx512_core_bf16"
        case dnnl_cpu_isa_avx512_core_vnni: return "avx512_core_vnni"
        case dnnl_cpu_isa_avx512_core: return "avx512_core"
        case dnnl_cpu_isa_avx2_vnni: return "avx2_vnni"
        case dnnl_cpu_isa_avx2: return "avx2"
        default: return "isa 0x\(String(isa.rawValue, radix: 16))"
        }
    }

    // MARK: Primitives

    /// What decides a matmul primitive: element types, layout, the bias and the sum post-op, and
    /// the OpenMP threads it runs on (fixed when it is created: oneDNN splits the work then).
    struct Shape: Hashable {
        let type: UInt32  // dnnl_data_type_t of A and B (C and the bias are f32)
        let transA: Bool, transB: Bool
        let m: Int, n: Int, k: Int, lda: Int, ldb: Int, ldc: Int
        let bias: Bool        // a row of n values added to every row of C, in the kernel
        let accumulate: Bool  // beta = 1
        let threads: Int
    }

    /// A primitive and the memory descriptors its arguments are created with.
    final class Primitive: @unchecked Sendable {
        let primitive: dnnl_primitive_t
        var a = dnnl_memory_desc_t(), b = dnnl_memory_desc_t(), c = dnnl_memory_desc_t(), bias = dnnl_memory_desc_t()
        var scratchpad = dnnl_memory_desc_t()
        let scratchpadBytes: Int
        let implementation: String
        var lastUse = 0

        init?(_ shape: Shape, api: API) {
            func describe(_ md: inout dnnl_memory_desc_t, rows: Int, cols: Int, transposed: Bool, ld: Int, type: dnnl_data_type_t) -> Bool {
                let dims: [dnnl_dim_t] = [dnnl_dim_t(rows), dnnl_dim_t(cols)]
                let strides: [dnnl_dim_t] = transposed ? [1, dnnl_dim_t(ld)] : [dnnl_dim_t(ld), 1]
                return api.memoryDescInit(&md, 2, dims, type, strides) == dnnl_success
            }
            let type = dnnl_data_type_t(shape.type)
            var a = dnnl_memory_desc_t(), b = dnnl_memory_desc_t(), c = dnnl_memory_desc_t(), bias = dnnl_memory_desc_t()
            guard describe(&a, rows: shape.m, cols: shape.k, transposed: shape.transA, ld: shape.lda, type: type),
                  describe(&b, rows: shape.k, cols: shape.n, transposed: shape.transB, ld: shape.ldb, type: type),
                  describe(&c, rows: shape.m, cols: shape.n, transposed: false, ld: shape.ldc, type: dnnl_f32),
                  !shape.bias || describe(&bias, rows: 1, cols: shape.n, transposed: false, ld: shape.n, type: dnnl_f32)
            else { return nil }
            var op = dnnl_matmul_desc_t()
            let described = shape.bias ? api.matmulDescInit(&op, &a, &b, &bias, &c) : api.matmulDescInit(&op, &a, &b, nil, &c)
            guard described == dnnl_success else { return nil }
            var attr: dnnl_primitive_attr_t?
            guard api.attrCreate(&attr) == dnnl_success else { return nil }
            defer { _ = api.attrDestroy(attr) }
            _ = api.attrScratchpad(attr, dnnl_scratchpad_mode_user)
            if shape.accumulate {
                var ops: dnnl_post_ops_t?
                guard api.postOpsCreate(&ops) == dnnl_success else { return nil }
                defer { _ = api.postOpsDestroy(ops) }
                guard api.postOpsSum(ops, 1) == dnnl_success, api.attrPostOps(attr, ops) == dnnl_success else { return nil }
            }
            var pd: dnnl_primitive_desc_t?
            let created = withUnsafePointer(to: &op) { op in
                api.pdCreate(&pd, UnsafeRawPointer(op), attr, api.engine, nil)
            }
            guard created == dnnl_success, let pd else { return nil }
            defer { _ = api.pdDestroy(pd) }
            var name: UnsafePointer<CChar>?
            _ = api.pdQuery(pd, dnnl_query_impl_info_str, 0, &name)
            implementation = name.map { String(cString: $0) } ?? "?"
            guard let scratch = api.pdQueryMD(pd, dnnl_query_scratchpad_md, 0) else { return nil }
            scratchpad = scratch.pointee
            scratchpadBytes = api.mdSize(scratch)
            var primitive: dnnl_primitive_t?
            guard api.primitiveCreate(&primitive, pd) == dnnl_success, let primitive else { return nil }
            self.primitive = primitive
            (self.a, self.b, self.c, self.bias) = (a, b, c, bias)
        }

        deinit { _ = OneDNN.api?.primitiveDestroy(primitive) }
    }

    /// Primitives kept at most (each holds compiled kernels; creating one takes about 0.1–1 ms).
    static let cacheLimit = 1024

    private final class Cache: @unchecked Sendable {
        var primitives: [Shape: Primitive] = [:]
        var failed: Set<Shape> = []
        var clock = 0
        let mutex = ProcessMutex()  // (every product looks its primitive up under it)
    }
    private static let cache = Cache()

    /// The OpenMP threads of an `m × n × k` product: ``BLASThreads/count(m:n:k:)``, at most the
    /// caller's OpenMP thread count when another library (PyTorch) shares the runtime, and one in
    /// a child of fork() whose ancestor may have started OpenMP threads (it loaded oneDNN, or
    /// another library loaded OpenMP before this process loaded oneDNN): GNU OpenMP cannot start
    /// threads there, and a product on two would wait for ever. (``load()`` counts forks from
    /// then on, so a fork after it always counts.)
    private static func threads(m: Int, n: Int, k: Int, api: API, callers: Int32?) -> Int {
        let forks = ProcessMutex.forks.load(ordering: .relaxed)
        if forks > (api.sharedRuntime ? 0 : api.forksAtLoad) { return 1 }
        let cap = api.sharedRuntime ? Swift.max(1, Int(callers ?? 1)) : Int.max
        return Swift.min(BLASThreads.count(m: m, n: n, k: k), cap)
    }

    /// The cached primitive for `shape`, created on first use; `nil` if oneDNN has none.
    static func primitive(_ shape: Shape, api: API) -> Primitive? {
        cache.mutex.withLock {
            cache.clock += 1
            if let found = cache.primitives[shape] {
                found.lastUse = cache.clock
                return found
            }
            guard !cache.failed.contains(shape), let made = Primitive(shape, api: api) else {
                cache.failed.insert(shape)
                return nil
            }
            if cache.primitives.count >= cacheLimit,
               let oldest = cache.primitives.min(by: { $0.value.lastUse < $1.value.lastUse })?.key {
                cache.primitives[oldest] = nil  // freed when no thread executes it any more
            }
            made.lastUse = cache.clock
            cache.primitives[shape] = made
            return made
        }
    }

    /// The implementations the cached primitives use, for reports (e.g. "brg:avx512_core_bf16").
    static var implementations: [String] {
        cache.mutex.withLock { Array(Set(cache.primitives.values.map(\.implementation))).sorted() }
    }

    // MARK: Per-thread stream and scratchpad

    private final class ThreadResources {
        let stream: dnnl_stream_t
        var scratchpad: HeapBuffer<UInt8>?

        init?(api: API) {
            var stream: dnnl_stream_t?
            guard api.streamCreate(&stream, api.engine, UInt32(dnnl_stream_default_flags.rawValue)) == dnnl_success,
                  let stream else { return nil }
            self.stream = stream
        }

        deinit { _ = OneDNN.api?.streamDestroy(stream) }
    }

    private static let threadKey: pthread_key_t = {
        var key = pthread_key_t()
        pthread_key_create(&key) { if let object = $0 { Unmanaged<AnyObject>.fromOpaque(object).release() } }
        return key
    }()

    private static func resources(api: API) -> ThreadResources? {
        if let existing = pthread_getspecific(threadKey) {
            return Unmanaged<AnyObject>.fromOpaque(existing).takeUnretainedValue() as? ThreadResources
        }
        guard let made = ThreadResources(api: api) else { return nil }
        pthread_setspecific(threadKey, Unmanaged.passRetained(made as AnyObject).toOpaque())
        return made
    }

    // MARK: GEMM

    /// A product too small for oneDNN's per-call cost (a primitive look-up and four or five
    /// memory objects, about 1 µs) to pay off: at most 16 Ki multiply-adds, which even OpenBLAS's
    /// oldest kernels finish in well under that. Such float32 products go to OpenBLAS.
    static func isTiny(m: Int, n: Int, k: Int) -> Bool {
        m <= 1 << 14 && n <= 1 << 14 && k <= 1 << 14 && m * n * k <= 1 << 14
    }

    /// `C = op(A) op(B) (+ 1 biasᵀ) + beta C` (`beta` 0 or 1), row-major, `A` and `B` of `type`,
    /// `C` and `bias` (`n` values, added to every row) float32. Returns false (nothing computed)
    /// when oneDNN cannot run it; the caller then computes it another way.
    static func gemm(
        type: dnnl_data_type_t, transA: Bool, transB: Bool, m: Int, n: Int, k: Int,
        a: UnsafeRawPointer, lda: Int, b: UnsafeRawPointer, ldb: Int, bias: UnsafePointer<Float>? = nil,
        accumulate: Bool, c: UnsafeMutablePointer<Float>, ldc: Int
    ) -> Bool {
        guard let api, m > 0, n > 0 else { return m == 0 || n == 0 }
        // oneDNN parallelises with OpenMP over the calling thread's thread count, read when a
        // primitive is created: use ours for this product (fewer for a small one) while it is
        // created and run, and give the caller's back (PyTorch shares this runtime).
        let callers = api.getThreads?()
        let threads = threads(m: m, n: n, k: k, api: api, callers: callers)
        let previous = callers ?? Int32(threads)
        if previous != Int32(threads) { api.setThreads?(Int32(threads)) }
        defer { if previous != Int32(threads) { api.setThreads?(previous) } }
        let shape = Shape(type: type.rawValue, transA: transA, transB: transB, m: m, n: n, k: k,
                          lda: lda, ldb: ldb, ldc: ldc, bias: bias != nil, accumulate: accumulate, threads: threads)
        guard let primitive = primitive(shape, api: api), let thread = resources(api: api) else { return false }
        var scratch: UnsafeMutableRawPointer? = nil
        if primitive.scratchpadBytes > 0 {
            if thread.scratchpad.map({ $0.count < primitive.scratchpadBytes }) ?? true {
                thread.scratchpad = nil
                thread.scratchpad = try? HeapBuffer<UInt8>(count: primitive.scratchpadBytes)
            }
            guard let buffer = thread.scratchpad else { return false }
            scratch = UnsafeMutableRawPointer(buffer.pointer)
        }
        var memories: [dnnl_memory_t?] = [nil, nil, nil, nil, nil]
        defer { for memory in memories where memory != nil { _ = api.memoryDestroy(memory) } }
        guard api.memoryCreate(&memories[0], &primitive.a, api.engine, UnsafeMutableRawPointer(mutating: a)) == dnnl_success,
              api.memoryCreate(&memories[1], &primitive.b, api.engine, UnsafeMutableRawPointer(mutating: b)) == dnnl_success,
              api.memoryCreate(&memories[2], &primitive.c, api.engine, UnsafeMutableRawPointer(c)) == dnnl_success,
              api.memoryCreate(&memories[3], &primitive.scratchpad, api.engine, scratch) == dnnl_success,
              bias == nil || api.memoryCreate(&memories[4], &primitive.bias, api.engine, UnsafeMutableRawPointer(mutating: bias)) == dnnl_success
        else { return false }
        var args = [
            dnnl_exec_arg_t(arg: loldu_dnnl_arg_src, memory: memories[0]),
            dnnl_exec_arg_t(arg: loldu_dnnl_arg_weights, memory: memories[1]),
            dnnl_exec_arg_t(arg: loldu_dnnl_arg_dst, memory: memories[2]),
            dnnl_exec_arg_t(arg: loldu_dnnl_arg_scratchpad, memory: memories[3]),
        ]
        if bias != nil { args.append(dnnl_exec_arg_t(arg: loldu_dnnl_arg_bias, memory: memories[4])) }
        return api.execute(primitive.primitive, thread.stream, Int32(args.count), args) == dnnl_success
    }
}
