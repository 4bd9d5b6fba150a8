import json, os, sys, time
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch
from idlm.bench.offline import bench_offline
from idlm.data.chat_prompts import read_prompts
from idlm.engine.llm_engine import EngineConfig, LLMEngine
from idlm.layers.lora import LoRAAdapter
from idlm.models.loader import load_pretrained
model, tok = load_pretrained("smollm2-135m-instruct", dtype="bfloat16", device="cuda")
lora = LoRAAdapter.load(os.environ["SMOL_ADAPTER"], model.config, device="cuda", dtype=model.dtype)
msgs = [p["messages"] for p in read_prompts(os.environ["SMOL_ADAPTER"] + "/prompts.jsonl")]
prompts = [tok.encode_chat(m) for m in msgs[:256]]
def b(eng, temp, tag):
    r = bench_offline(eng, prompts, [1], max_tokens=128, temperature=temp, warmup=True)[0]
    print(json.dumps({tag: {k: r.get(k) for k in ("per_request_tok_s", "decode_step_ms", "tpf", "num_requests")},
                      "pages": eng.config.num_pages, "free_gb": torch.cuda.mem_get_info()[0] / 2**30}), flush=True)
risd = LLMEngine(model, tok, EngineConfig(decoder="risd", stride=4, max_num_seqs=64), lora=lora)
b(risd, 0.0, "alone_T0"); b(risd, 0.7, "alone_T0.7")
ar = LLMEngine(model, tok, EngineConfig(decoder="ar", max_num_seqs=64))
auto = LLMEngine(model, tok, EngineConfig(decoder="risd", stride="auto", max_num_seqs=64), lora=lora)
b(ar, 0.7, "ar_T0.7"); b(risd, 0.7, "with3_T0.7"); b(auto, 0.7, "auto_T0.7"); b(risd, 0.7, "with3_again_T0.7")
risd1 = LLMEngine(model, tok, EngineConfig(decoder="risd", stride=4, max_num_seqs=1), lora=lora)
b(risd1, 0.7, "seqs1_T0.7")
