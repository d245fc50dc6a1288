// The README's Node examples, verbatim in spirit: a plain and a streaming chat completion with the official SDK.
// Usage: MODELMAX_API_KEY=... MODELMAX_BASE_URL=http://127.0.0.1:8000/v1 node chat.mjs
// Prints one JSON line with what the SDK returned, for tests/e2e/test_node_sdk.py to check.
import OpenAI from "openai";

const client = new OpenAI({
  apiKey: process.env.MODELMAX_API_KEY,
  baseURL: process.env.MODELMAX_BASE_URL,
  maxRetries: 0,
});
const model = process.env.MODELMAX_MODEL ?? "smollm2-135m";

const response = await client.chat.completions.create({
  model,
  messages: [
    { role: "system", content: "You are a helpful assistant." },
    { role: "user", content: "What is the capital of France?" },
  ],
  max_tokens: 16,
  temperature: 0,
});

const stream = await client.chat.completions.create({
  model,
  messages: [
    { role: "system", content: "You are a helpful assistant." },
    { role: "user", content: "What is the capital of France?" },
  ],
  max_tokens: 16,
  temperature: 0,
  stream: true,
  stream_options: { include_usage: true },
});

let streamed = "";
let chunks = 0;
let finishReason = null;
let usage = null;
for await (const chunk of stream) {
  chunks += 1;
  const content = chunk.choices[0]?.delta?.content;
  if (content) streamed += content;
  finishReason = chunk.choices[0]?.finish_reason ?? finishReason;
  usage = chunk.usage ?? usage;
}

console.log(JSON.stringify({
  plain: response.choices[0].message.content,
  plainFinish: response.choices[0].finish_reason,
  plainUsage: response.usage,
  streamed,
  chunks,
  streamFinish: finishReason,
  streamUsage: usage,
}));
