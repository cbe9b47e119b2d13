// llama.cpp (npm node-llama-cpp, prebuilt CPU binaries) loads and runs Bastion's GGUF exports.
// Reads check.json from bench/llama_cpp_gguf_check.py (which says how to install and run both),
// greedy-decodes each prompt's token ids with the f16, q8_0 and q4_0 files and reports decode
// tokens/s per file and how many greedy tokens agree with the f16 file and with Bastion itself.
//
//   NODE_PATH=/tmp/llamacheck/node_modules node bench/llama_cpp_gguf_check.mjs /tmp/llamacheck/work/check.json [threads]
//
// Token ids go in as they are (no tokenizing in llama.cpp), so only the weights differ.
import {readFileSync} from "node:fs";
import {createRequire} from "node:module";

// NODE_PATH is not used by ESM imports; resolve the package through require's search path.
const require = createRequire(import.meta.url);
const {getLlama} = await import(require.resolve("node-llama-cpp"));

const check = JSON.parse(readFileSync(process.argv[2], "utf8"));
const threads = Number(process.argv[3] ?? 1);

async function decode(model, ids, n) {
    const context = await model.createContext({contextSize: 512, threads});
    const sequence = context.getSequence();
    const out = [];
    let firstAt = 0;
    for await (const token of sequence.evaluate(ids, {temperature: 0})) {  // temperature 0: argmax
        out.push(token);
        if (out.length === 1) firstAt = performance.now();  // after the prompt's prefill
        if (out.length >= n) break;
    }
    const decodeSeconds = (performance.now() - firstAt) / 1000;
    const decoded = out.length - 1;
    if (out.length < n && check.eos !== null) out.push(check.eos);  // llama.cpp ended at end-of-generation
    await context.dispose();
    return {tokens: out, decoded, decodeSeconds};
}

// Position by position, over the longer of the two (a token missing on one side disagrees).
function agreement(a, b) {
    let prefix = 0;
    while (prefix < a.length && a[prefix] === b[prefix]) prefix++;
    const same = a.filter((t, i) => t === b[i]).length;
    return {prefix, same, length: Math.max(a.length, b.length)};
}

const llama = await getLlama({gpu: false, build: "never", logLevel: "error"});
console.log(`llama.cpp: ${llama.buildType} binaries, ${threads} thread(s); ${(check.params / 1e6).toFixed(1)}M parameters`);
const results = {};
for (const [dtype, path] of Object.entries(check.files)) {
    const model = await llama.loadModel({modelPath: path, gpuLayers: 0});
    results[dtype] = [];
    await decode(model, check.prompts[0].ids, 4);  // warm-up
    for (const prompt of check.prompts)
        results[dtype].push(await decode(model, prompt.ids, check.tokens));
    await model.dispose();
}
for (const [dtype, runs] of Object.entries(results)) {
    const seconds = runs.reduce((s, r) => s + r.decodeSeconds, 0);
    const tokS = runs.reduce((s, r) => s + r.decoded, 0) / seconds;
    const vsF16 = runs.map((r, i) => agreement(r.tokens, results.f16[i].tokens));
    const vsBastion = runs.map((r, i) => agreement(r.tokens, check.prompts[i].bastion));
    const sum = (xs, k) => xs.reduce((s, x) => s + x[k], 0);
    const describe = (xs) => `${sum(xs, "same")}/${sum(xs, "length")} tokens same, ` +
        `${xs.filter(a => a.same === a.length).length}/${xs.length} prompts identical` +
        (xs.length <= 8 ? ` (common prefix ${xs.map(a => a.prefix).join(",")})` : "");
    console.log(`${dtype.padEnd(5)} ${(check.sizes[dtype] / 2 ** 20).toFixed(1).padStart(6)} MiB  ` +
        `${tokS.toFixed(1).padStart(7)} tok/s  vs f16: ${describe(vsF16)}  vs Bastion: ${describe(vsBastion)}`);
}
