// `loldu`: inspect, verify, export and merge LoLDU checkpoints from the command line.
//
// Every operation goes through the C ABI of include/loldu.h, as any program would; the core's
// name tables (dtypes, initialisations) and its model-file reader (for tensor shapes) are
// shared rather than written twice.
import CLoLDU
import Glibc
import LoLDU

/// Exit codes (documented in `loldu --help` and the README).
enum Exit: Int32 {
    case ok = 0
    case failure = 1   // the operation failed: the message says why
    case usage = 2     // the command line is wrong
    case mismatch = 3  // the adapter was not trained on this base (any command)
}

struct Failure: Error {
    let code: Exit
    let message: String
}

let tool = "loldu"

/// Writes all of `text` to the file descriptor `fd`; false (and `errno`) when a write fails.
@discardableResult func writeAll(_ fd: Int32, _ text: String) -> Bool {
    var bytes = Array(text.utf8)
    var done = 0
    while done < bytes.count {
        let n = bytes.withUnsafeMutableBytes { write(fd, $0.baseAddress! + done, $0.count - done) }
        if n < 0 && errno == EINTR { continue }
        if n <= 0 { return false }
        done += n
    }
    return true
}

/// Writes `text` to standard error (a failure has nowhere to be reported).
func printError(_ text: String) { writeAll(2, text) }

/// The `errno` of the first failed write to standard output (0: none), reported at exit.
nonisolated(unsafe) var outputError: Int32 = 0

/// Writes `text` and a newline to standard output, unbuffered, remembering a failure.
func printLine(_ text: String) {
    if outputError == 0 && !writeAll(1, text + "\n") { outputError = errno == 0 ? EIO : errno }
}

let usage = """
    usage: loldu COMMAND [ARGUMENTS]

    Inspect, check, export and merge LoLDU adapter checkpoints (directories written by
    save_loldu, loldu.save or loldu_checkpoint_save).

    commands:
      inspect ADAPTER [--json]               layers, shapes, ranks, σ, z statistics, sizes, fingerprints
      verify ADAPTER --base MODEL            exit 0 if every layer was trained on MODEL's weights
      export-lora ADAPTER --base MODEL --out DIR
                                             write the adapter as a PEFT LoRA (exact)
      merge ADAPTER --base MODEL --out DIR   write MODEL with the adapter merged into its weights

    MODEL is a model directory as transformers saves it (config.json, model.safetensors or
    shards with model.safetensors.index.json). `loldu COMMAND --help` tells more.

    options:
      -h, --help       this text
      --version        the library version

    exit codes: 0 success; 1 failure (the message says why); 2 bad command line;
                3 the adapter does not match the base model (verify reports the layers;
                export-lora and merge refuse).
    """

let helps: [String: String] = [
    "inspect": """
        usage: loldu inspect ADAPTER [--json]

        Prints what the checkpoint directory ADAPTER holds: per layer its name, element type,
        shape, rank, σ, statistics of z, and the fingerprints of the base weight and pivots it was
        trained on; the files' sizes and this library's version. --json prints the same as one
        JSON object (for scripts).
        """,
    "verify": """
        usage: loldu verify ADAPTER --base MODEL

        Checks every layer of ADAPTER against MODEL: the layer's weight tensor exists, has the
        saved shape and fingerprint, and factors to the saved pivots. Prints one line per layer;
        exit 0 when all match, 3 when one does not, 1 when the files cannot be read.
        """,
    "export-lora": """
        usage: loldu export-lora ADAPTER --base MODEL --out DIR [--dtype f32|f16|bf16]
                                 [--base-name NAME] [--embedding LAYER]... [--linear LAYER]... [--force]

        Writes ADAPTER as a PEFT LoRA directory DIR (adapter_config.json, adapter_model.safetensors),
        exact: ΔW = A diag(c) U_r is a rank-r LoRA with lora_B = A diag(c), lora_A = U_r, lora_alpha = r.
        It loads with peft.PeftModel.from_pretrained, in vLLM, and converts to GGUF with llama.cpp's
        convert_lora_to_gguf.py.

          --base MODEL       the base model directory (the factors are computed from its weights)
          --out DIR          the new directory, or an empty one (--force replaces an earlier export)
          --dtype T          the tensors' type: f32 (default), f16 or bf16
          --base-name NAME   base_model_name_or_path in the config (default: MODEL as given)
          --embedding LAYER  LAYER is an nn.Embedding (PEFT's lora_embedding_A/B); repeat as needed
          --linear LAYER     LAYER is an nn.Linear although its name looks like an embedding's
          --force            replace DIR if it holds an earlier LoRA export (and nothing else)
        Layers whose weight has more than 2 dimensions are exported as convolutions, others as
        linear layers; a checkpoint does not record which 2-dimensional layers are embeddings,
        so a 2-dimensional layer named like one ("embed" anywhere, or ending in "wte" or "wpe")
        needs --embedding or --linear.
        """,
    "merge": """
        usage: loldu merge ADAPTER --base MODEL --out DIR [--dtype f32|f16|bf16]

        Writes a copy of MODEL with ADAPTER merged into its weights: the same files (one, or the
        same shards and index), tensor names and types, W + ΔW computed in float32 and rounded
        once; config.json, the tokenizer and other files copied (not weights in other formats,
        such as *.bin or *.onnx, which would still hold the unmerged weights; safetensors files
        in subdirectories, other modules' weights, are copied).
        transformers' from_pretrained(DIR) loads the result.

          --base MODEL   the base model directory
          --out DIR      the new directory (or an empty one). It appears only when complete.
          --dtype T      convert every F32, F16 and BF16 tensor to f32, f16 or bf16 (F64 and
                         integer tensors keep their type; default: every tensor keeps its type)
        """,
]

// MARK: Calling the library

/// Runs a library call; a failure becomes a message with advice (`ifExists`: for an output
/// that is already there).
func check(_ status: loldu_status, _ what: String, ifExists: String = "") throws(Failure) {
    guard status != LOLDU_OK else { return }
    throw failure(status, String(cString: loldu_last_error()), what, ifExists: ifExists)
}

/// A library error as the command reports it: `what` failed, the message, then advice.
func failure(_ status: loldu_status, _ message: String, _ what: String, ifExists: String = "") -> Failure {
    let advice: String
    switch status {
    case LOLDU_ERR_MISMATCH: advice = "check that --base is the model the adapter was trained on"
    case LOLDU_ERR_IO where message.contains("already exists") || message.contains("not empty"): advice = ifExists
    case LOLDU_ERR_IO where message.contains("Permission denied") || message.contains("Read-only"): advice = "check the path's permissions"
    case LOLDU_ERR_FORMAT: advice = "the file is damaged or not of the expected kind"
    case LOLDU_ERR_OUT_OF_MEMORY: advice = "free memory, or merge on a machine with more"
    default: advice = ""
    }
    return Failure(code: status == LOLDU_ERR_MISMATCH ? .mismatch : .failure,
                   message: (message.hasPrefix(what) ? message : "\(what): \(message)") + (advice.isEmpty ? "" : "\n  (\(advice))"))
}

final class CheckpointFile {
    let handle: OpaquePointer
    let names: [String]

    init(_ path: String) throws(Failure) {
        var raw: OpaquePointer?
        try check(loldu_checkpoint_open(&raw, path), "cannot read the checkpoint \"\(path)\"")
        let handle = raw!
        var count = 0
        loldu_checkpoint_count(handle, &count)
        self.handle = handle
        names = (0..<count).map { i in
            var name: UnsafePointer<CChar>?
            loldu_checkpoint_name(handle, i, &name)
            return String(cString: name!)
        }
    }

    deinit { loldu_checkpoint_free(handle) }

    func adapter(_ name: String, base: String) throws(Failure) -> OpaquePointer {
        var adapter: OpaquePointer?
        try check(loldu_checkpoint_create(&adapter, handle, name, base), "layer \"\(name)\"")
        return adapter!
    }
}

// MARK: Progress on a terminal

/// One status line on stderr, redrawn at most ten times a second, only on a terminal.
struct ProgressLine {
    let enabled = isatty(2) == 1
    var last = 0.0

    mutating func show(_ text: String, force: Bool = false) {
        guard enabled else { return }
        let t = monotonicSeconds()
        guard force || t - last >= 0.1 else { return }
        last = t
        let columns = 100
        let line = text.count > columns ? String(text.prefix(columns - 1)) + "…" : text
        printError("\r\u{1B}[K" + line)
    }

    func finish() {
        if enabled { printError("\r\u{1B}[K") }
    }
}

// MARK: Commands

/// What a command accepts: options that take a value, and flags.
struct Options {
    var values: Set<String> = []
    var flags: Set<String> = []
}

struct Arguments {
    let command: String
    var positional: [String] = []
    var options: [String: [String]] = [:]
    var flags: Set<String> = []
    /// `-h` or `--help` was given where an option can stand (not as an option's value, as in
    /// `--base-name --help`): the command's help is printed instead of running it, whatever else
    /// is wrong with the line.
    var help = false

    /// Parses `args` given the options the command accepts.
    init(_ args: [String], command: String, accepts known: Options) throws(Failure) {
        self.command = command
        var failure: Failure?
        var i = 0
        while i < args.count {
            let arg = args[i]
            i += 1
            if arg == "--" {
                positional += args[i...]
                break
            }
            guard arg.hasPrefix("-"), arg != "-" else {
                positional.append(arg)
                continue
            }
            var name = arg, value: String?
            if let eq = arg.firstIndex(of: "=") {
                name = String(arg[..<eq])
                value = String(arg[arg.index(after: eq)...])
            }
            if name == "-h" || name == "--help" {
                guard value == nil else {
                    failure = failure ?? usage("\(name) takes no value")
                    continue
                }
                help = true
                return
            }
            if known.flags.contains(name) {
                if value != nil { failure = failure ?? usage("\(name) takes no value") }
                flags.insert(name)
            } else if known.values.contains(name) {
                if value == nil {
                    guard i < args.count else {
                        failure = failure ?? usage("\(name) needs a value")
                        break
                    }
                    value = args[i]
                    i += 1
                }
                options[name, default: []].append(value!)
            } else {
                failure = failure ?? usage("unknown option \(name)")
            }
        }
        if let failure { throw failure }
    }

    func one(_ name: String, required: Bool = true) throws(Failure) -> String? {
        let given = options[name] ?? []
        if given.count > 1 { throw usage("\(name) is given \(given.count) times") }
        if required && given.isEmpty { throw usage("\(name) is required") }
        if given.first?.isEmpty == true { throw usage("\(name) needs a non-empty value") }
        return given.first
    }

    func adapter() throws(Failure) -> String {
        guard positional.count == 1 else {
            throw usage(positional.isEmpty ? "ADAPTER is missing" : "one ADAPTER expected, got \(positional.count) arguments")
        }
        guard !positional[0].isEmpty else { throw usage("ADAPTER must not be empty") }
        return positional[0]
    }

    /// `--out`: a directory to create, named by its last component (``checkNewDirectoryName``).
    func output() throws(Failure) -> String {
        let out = try one("--out")!
        do { try checkNewDirectoryName(out, what: "--out") } catch { throw usage(error.message) }
        return out
    }

    /// A usage error of this command.
    func usage(_ message: String) -> Failure {
        Failure(code: .usage, message: "\(message)\n  (see: loldu \(command) --help)")
    }
}

func dtype(_ a: Arguments) throws(Failure) -> loldu_dtype? {
    guard let text = try a.one("--dtype", required: false) else { return nil }
    switch text.lowercased() {
    case "f32", "float32": return LOLDU_FLOAT32
    case "f16", "float16": return LOLDU_FLOAT16
    case "bf16", "bfloat16": return LOLDU_BFLOAT16
    default: throw a.usage("--dtype must be f32, f16 or bf16, got \"\(text)\"")
    }
}

func fileBytes(_ directory: String) -> Int {
    ["adapter_model.safetensors", "adapter_config.json"].reduce(0) { total, name in
        var info = stat()
        return total + (stat("\(directory)/\(name)", &info) == 0 ? Int(info.st_size) : 0)
    }
}

func number(_ x: Double) -> String {
    guard x.isFinite else { return "\(x)" }
    if x == 0 { return "0" }
    let magnitude = abs(x)
    if magnitude >= 1e-3 && magnitude < 1e5 {
        var text = String(format4: x)
        while text.contains(".") && (text.hasSuffix("0") || text.hasSuffix(".")) { text.removeLast() }
        return text
    }
    let short = Float(x)  // (7 digits, for a table; float64 values outside its normal range as they are)
    return short.isNormal ? "\(short)" : "\(x)"
}

/// Mean and standard deviation of `z` (not empty), without overflow for any finite values.
func meanAndDeviation(_ z: [Double]) -> (mean: Double, std: Double) {
    let scale = z.reduce(0) { max($0, abs($1)) }
    guard scale > 0 else { return (0, 0) }
    let count = Double(z.count)
    let mean = z.reduce(0) { $0 + ($1 / scale) / count }
    let variance = z.reduce(0) { $0 + ($1 / scale - mean) * ($1 / scale - mean) } / count
    return (mean * scale, variance.squareRoot() * scale)
}

extension String {
    /// `x` with 4 decimals (no Foundation).
    init(format4 x: Double) {
        let scaled = (abs(x) * 10_000).rounded()
        let whole = Int(scaled / 10_000), fraction = Int(scaled) % 10_000
        let digits = String(fraction)
        self = (x < 0 ? "-" : "") + "\(whole)." + String(repeating: "0", count: 4 - digits.count) + digits
    }
}

func inspect(_ a: Arguments) throws(Failure) {
    let path = try a.adapter()
    let checkpoint = try CheckpointFile(path)
    var layers: [JSON] = []
    var lines: [[String]] = [["layer", "dtype", "shape", "rank", "σ", "z mean", "z std", "z min", "z max", "weight fp", "pivots fp"]]
    var trainable = 0
    for name in checkpoint.names {
        var type: loldu_dtype = LOLDU_FLOAT32
        var m: Int64 = 0, n: Int64 = 0
        var config = loldu_config()
        try check(loldu_checkpoint_layer(checkpoint.handle, name, &type, &m, &n, &config), "layer \"\(name)\"")
        var z = [Double](repeating: 0, count: Int(config.rank))
        var sigma = 0.0
        var weightPrint = [CChar](repeating: 0, count: 17), pivotsPrint = [CChar](repeating: 0, count: 17)
        try check(loldu_checkpoint_values(checkpoint.handle, name, &z, &sigma, &weightPrint, &pivotsPrint), "layer \"\(name)\"")
        let (mean, std) = meanAndDeviation(z)
        let dtypeName = DType(rawValue: Int32(type.rawValue))?.name ?? "?"
        func text(_ c: [CChar]) -> String { String(decoding: c.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self) }
        let wp = text(weightPrint), pp = text(pivotsPrint)
        trainable += z.count + (config.train_sigma == 1 ? 1 : 0)
        layers.append(.object([
            "name": .string(name), "dtype": .string(dtypeName), "m": .number(Int(m)), "n": .number(Int(n)),
            "rank": .number(Int(config.rank)), "alpha": .number(config.alpha == 0 ? Double(config.rank) : config.alpha),
            "z_init": .string(ZInit(rawValue: config.z_init)?.name ?? "?"),
            "residual": .string(Residual(rawValue: config.residual)?.name ?? "?"),
            "train_sigma": .bool(config.train_sigma == 1), "sigma": .number(sigma),
            "z": .object(["mean": .number(mean), "std": .number(std), "min": .number(z.min() ?? 0), "max": .number(z.max() ?? 0)]),
            "weight_fingerprint": .string(wp), "pivots_fingerprint": .string(pp),
        ]))
        lines.append([name, dtypeName, "\(m)×\(n)", "\(config.rank)", number(sigma), number(mean), number(std),
                      number(z.min() ?? 0), number(z.max() ?? 0), wp, pp])
    }
    let version = String(cString: loldu_version_string())
    let bytes = fileBytes(path)
    if a.flags.contains("--json") {
        printLine(JSON.object([
            "checkpoint": .string(path), "library_version": .string(version), "bytes": .number(bytes),
            "trainable": .number(trainable), "layers": .array(layers),
        ]).pretty())
        return
    }
    printLine("checkpoint \(path): \(checkpoint.names.count) layers, \(trainable) trainable values, \(bytes) bytes (loldu \(version))")
    let widths = (0..<lines[0].count).map { column in lines.map { $0[column].count }.max() ?? 0 }
    for line in lines {
        let padded = zip(line, widths).map { $0 + String(repeating: " ", count: $1 - $0.count) }.joined(separator: "  ")
        printLine(String(padded.reversed().drop(while: { $0 == " " }).reversed()))
    }
}

/// The model files at `--base`, or a failure naming it.
func baseModel(_ base: String) throws(Failure) -> ModelFiles {
    do {
        return try ModelFiles(directory: base)
    } catch {
        throw failure(loldu_status(UInt32(error.code.rawValue)), error.message, "cannot read the base model \"\(base)\" (--base)")
    }
}

func verify(_ a: Arguments) throws(Failure) {
    let path = try a.adapter()
    let base = try a.one("--base")!
    let checkpoint = try CheckpointFile(path)
    _ = try baseModel(base)
    var progress = ProgressLine()
    var bad = 0
    for (i, name) in checkpoint.names.enumerated() {
        progress.show("checking \(i + 1)/\(checkpoint.names.count) \(name)", force: true)
        do throws(Failure) {
            loldu_adapter_free(try checkpoint.adapter(name, base: base))
            progress.finish()
            printLine("ok       \(name)")
        } catch where error.code == .mismatch {
            progress.finish()
            printLine("MISMATCH \(name): \(String(cString: loldu_last_error()))")
            bad += 1
        }
    }
    guard bad == 0 else {
        throw Failure(code: .mismatch, message: "\(bad) of \(checkpoint.names.count) layers do not match \(base)")
    }
    printLine("all \(checkpoint.names.count) layers match \(base)")
}

/// Names that the export-lora help lists as an embedding's ("embed" anywhere, or a last
/// component "wte" or "wpe", GPT-2's).
func namedLikeEmbedding(_ name: String) -> Bool {
    let last = name.split(separator: ".").last.map { $0.lowercased() } ?? ""
    return name.lowercased().contains("embed") || last == "wte" || last == "wpe"
}

func exportLoRA(_ a: Arguments) throws(Failure) {
    let path = try a.adapter()
    let base = try a.one("--base")!, out = try a.output()
    let type = try dtype(a) ?? LOLDU_FLOAT32
    let checkpoint = try CheckpointFile(path)
    let embeddings = Set(a.options["--embedding"] ?? []), linear = Set(a.options["--linear"] ?? [])
    for (option, names) in [("--embedding", embeddings), ("--linear", linear)] {
        if let unknown = names.subtracting(checkpoint.names).sorted().first {
            throw a.usage("\(option) \(unknown): the checkpoint has no such layer")
        }
    }
    if let both = embeddings.intersection(linear).sorted().first {
        throw a.usage("layer \"\(both)\" is given as both --embedding and --linear")
    }
    let model = try baseModel(base)
    // Each layer's kind, before any work: a weight of more than 2 dimensions is a convolution;
    // a 2-dimensional one is linear unless declared an embedding, and one named like an
    // embedding must be declared (exported as linear, PEFT would load it with a warning and
    // compute something else).
    var layers: [loldu_lora_layer] = []
    for name in checkpoint.names {
        var layer = loldu_lora_layer()
        let shape = (try? model.weightKey(layer: name)).flatMap { model.tensor($0)?.tensor.shape } ?? []
        let declared = embeddings.contains(name) ? "--embedding" : linear.contains(name) ? "--linear" : nil
        if shape.count > 5 {
            throw Failure(code: .failure, message: "layer \"\(name)\": its weight in the base model has \(shape.count) dimensions \(shape); a LoRA can be written for linear layers, embeddings and 1–3-dimensional convolutions")
        } else if shape.count > 2 {
            if let declared {
                throw a.usage("\(declared) \(name): its weight has \(shape.count) dimensions \(shape), so it is exported as a convolution")
            }
            layer.kind = Int32(LOLDU_LORA_CONV.rawValue)
            layer.kernel_dims = Int32(shape.count - 2)
            withUnsafeMutableBytes(of: &layer.kernel) { raw in
                for (k, size) in shape.dropFirst(2).enumerated() { raw.storeBytes(of: Int64(size), toByteOffset: 8 * k, as: Int64.self) }
            }
        } else if embeddings.contains(name) {
            layer.kind = Int32(LOLDU_LORA_EMBEDDING.rawValue)
        } else if declared == nil && !shape.isEmpty && namedLikeEmbedding(name) {  // (a layer the base lacks: a mismatch, below)
            throw a.usage("layer \"\(name)\" is named like an embedding, which PEFT stores differently; pass --embedding \(name) if it is an nn.Embedding, --linear \(name) if it is an nn.Linear")
        }
        layers.append(layer)
    }
    var adapters: [OpaquePointer?] = []
    defer { adapters.forEach { loldu_adapter_free($0) } }
    var progress = ProgressLine()
    for (i, name) in checkpoint.names.enumerated() {
        progress.show("factoring \(i + 1)/\(checkpoint.names.count) \(name)", force: true)
        adapters.append(try checkpoint.adapter(name, base: base))
    }
    progress.show("writing \(out)", force: true)
    var options = loldu_lora_options()
    loldu_lora_options_default(&options)
    options.dtype = Int32(type.rawValue)
    options.replace = a.flags.contains("--force") ? 1 : 0
    let baseName = try a.one("--base-name", required: false) ?? base
    let status = baseName.withCString { name in
        options.base_model_name_or_path = name
        return layers.withUnsafeBufferPointer { list in
            options.layers = list.baseAddress
            let names = checkpoint.names.map { strdup($0) }
            defer { names.forEach { free($0) } }
            let pointers = names.map { UnsafePointer($0) }
            return loldu_export_lora(out, adapters, pointers, adapters.count, &options)
        }
    }
    progress.finish()
    try check(status, "cannot export to \"\(out)\"", ifExists: "pass --force to replace an earlier export")
    printLine("wrote \(out): a PEFT LoRA of \(checkpoint.names.count) layers")
}

func merge(_ a: Arguments) throws(Failure) {
    let path = try a.adapter()
    let base = try a.one("--base")!, out = try a.output()
    let type = try dtype(a)
    let checkpoint = try CheckpointFile(path)
    _ = try baseModel(base)
    var options = loldu_merge_options()
    loldu_merge_options_default(&options)
    if let type { options.dtype = Int32(type.rawValue) }
    var progress = ProgressLine()
    stopOnSignals()
    let status: loldu_status = withUnsafeMutablePointer(to: &progress) { line in
        options.user = line.pointee.enabled ? UnsafeMutableRawPointer(line) : nil
        options.progress = { user, done, total, tensor in
            guard stopSignal == 0 else { return 1 }  // (the library then removes what it wrote)
            if let line = user?.assumingMemoryBound(to: ProgressLine.self) {
                let percent = total == 0 ? 100 : Int(done * 100 / total)
                line.pointee.show("merging \(percent)% (\(done >> 20) of \(total >> 20) MiB) \(String(cString: tensor!))",
                                  force: done == total)
            }
            return 0
        }
        return loldu_merge_model(out, base, checkpoint.handle, &options)
    }
    progress.finish()
    if stopSignal != 0 {  // die of the signal, as the shell expects, once the library has cleaned up
        printError(status == LOLDU_ERR_CANCELLED ? "\(tool) merge: stopped by signal \(stopSignal); \"\(out)\" was not written\n"
                   : "\(tool) merge: signal \(stopSignal) after the last tensor; \"\(out)\" is complete\n")
        signal(stopSignal, SIG_DFL)
        raise(stopSignal)
    }
    try check(status, "cannot merge into \"\(out)\"", ifExists: "merge into a new directory (--out)")
    printLine("wrote \(out): \(base) with \(checkpoint.names.count) layers merged")
}

/// The signal (SIGINT, SIGTERM) that asked a long command to stop, 0 until one arrives: set by
/// the handler ``stopOnSignals()`` installs, polled by the command between steps so that the
/// library can remove what it had written.
nonisolated(unsafe) var stopSignal: Int32 = 0

func stopOnSignals() {
    for s in [SIGINT, SIGTERM] {
        signal(s) { stopSignal = $0 }
    }
}

// MARK: Main

/// Each command: what it accepts and what runs it.
let commands: [String: (accepts: Options, run: (Arguments) throws(Failure) -> Void)] = [
    "inspect": (Options(flags: ["--json"]), inspect),
    "verify": (Options(values: ["--base"]), verify),
    "export-lora": (Options(values: ["--base", "--out", "--dtype", "--base-name", "--embedding", "--linear"], flags: ["--force"]),
                    exportLoRA),
    "merge": (Options(values: ["--base", "--out", "--dtype"]), merge),
]

/// Opens the standard streams that are closed on `/dev/null`, so that no file a command opens
/// takes their numbers (a report printed into a model file); returns whether standard output
/// was closed.
func reopenClosedStandardStreams() -> Bool {
    var outputClosed = false
    for fd: Int32 in 0...2 where fcntl(fd, F_GETFD) == -1 {
        let null = open("/dev/null", fd == 0 ? O_RDONLY : O_WRONLY)
        if null >= 0 && null != fd {
            dup2(null, fd)
            close(null)
        }
        if fd == 1 { outputClosed = true }
    }
    return outputClosed
}

/// Runs the command line and reports a failed write to standard output (a full disk, a closed
/// stream) as a failure.
@MainActor func main() -> Int32 {
    let outputClosed = reopenClosedStandardStreams()
    for i in 1..<Int(CommandLine.argc) where String(validatingCString: CommandLine.unsafeArgv[i]!) == nil {
        printError("\(tool): argument \(i) is not valid UTF-8; paths and names must be UTF-8\n")
        return Exit.usage.rawValue
    }
    let code = run(Array(CommandLine.arguments.dropFirst()))
    if outputClosed || outputError != 0 {
        printError("\(tool): cannot write to standard output: \(outputClosed ? "it is closed" : String(cString: strerror(outputError)))\n")
        return code == Exit.ok.rawValue ? Exit.failure.rawValue : code
    }
    return code
}

@MainActor func run(_ args: [String]) -> Int32 {
    guard let first = args.first else {
        printError(usage + "\n")
        return Exit.usage.rawValue
    }
    switch first {
    case "-h", "--help", "help":
        guard args.count > 1 else {
            printLine(usage)
            return Exit.ok.rawValue
        }
        guard args.count == 2, let help = helps[args[1]] else {
            printError("\(tool): \(first) takes one command, one of \(commands.keys.sorted().joined(separator: ", ")); got \(args.dropFirst().joined(separator: " "))\n")
            return Exit.usage.rawValue
        }
        printLine(help)
        return Exit.ok.rawValue
    case "--version", "version":
        guard args.count == 1 else {
            printError("loldu: \(first) takes no arguments, got \(args.dropFirst().joined(separator: " "))\n")
            return Exit.usage.rawValue
        }
        printLine("loldu \(String(cString: loldu_version_string()))")
        return Exit.ok.rawValue
    default:
        break
    }
    guard let command = commands[first] else {
        printError("\(tool): unknown command \"\(first)\"\n  (commands: \(commands.keys.sorted().joined(separator: ", ")); see: loldu --help)\n")
        return Exit.usage.rawValue
    }
    do throws(Failure) {
        let a = try Arguments(Array(args.dropFirst()), command: first, accepts: command.accepts)
        if a.help {
            printLine(helps[first]!)
        } else {
            try command.run(a)
        }
        return Exit.ok.rawValue
    } catch {
        if isatty(2) == 1 { printError("\r\u{1B}[K") }  // (after a progress line)
        printError("\(tool) \(first): \(error.message)\n")
        return error.code.rawValue
    }
}

exit(main())
