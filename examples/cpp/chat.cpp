// Interactive chat with the C++ wrapper (bindings/cpp/ember.hpp), using the model's chat
// template. Reads one user message per line from stdin until EOF and prints each reply on
// stdout (the "> " prompt goes to stderr, so piped output is only the replies). The whole
// conversation stays in one session: each turn computes only its new tokens.
//
//   c++ -std=c++17 -Iinclude -Ibindings/cpp examples/cpp/chat.cpp -Ltarget/release -lember -o chat
//   ./chat models/SmolLM2-135M-Instruct.Q4_1.gguf --system "Be brief."
//
// Options: --system TEXT, --max-tokens N (per reply, default 256), --threads N (0 = half the
// cores), --temperature T (0 = greedy), --seed S. Prints exactly what
// examples/python/chat.py prints for the same input and options.
#include "ember.hpp"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <string>
#include <vector>

namespace {

struct Options {
  const char *model = nullptr;
  const char *system = nullptr;
  uint32_t max_tokens = 256;
  uint32_t threads = 0;
  float temperature = 0.0f;
  const char *seed = nullptr;
};

bool parse(int argc, char **argv, Options &o) {
  for (int i = 1; i < argc; i++) {
    std::string arg = argv[i];
    bool has_value = i + 1 < argc;
    if (arg == "--system" && has_value) o.system = argv[++i];
    else if (arg == "--max-tokens" && has_value) o.max_tokens = static_cast<uint32_t>(std::atoi(argv[++i]));
    else if (arg == "--threads" && has_value) o.threads = static_cast<uint32_t>(std::atoi(argv[++i]));
    else if (arg == "--temperature" && has_value) o.temperature = std::strtof(argv[++i], nullptr);
    else if (arg == "--seed" && has_value) o.seed = argv[++i];
    else if (!o.model && arg.rfind("--", 0) != 0) o.model = argv[i];
    else return false;
  }
  return o.model != nullptr;
}

// Streams the assistant's reply to stdout and returns it.
std::string say(ember::Session &session, const std::vector<ember::ChatMessage> &messages,
                ember::Sampler &sampler, const ember::GenerateOptions &options) {
  std::string reply;
  session.chat(messages, sampler, options, [&](std::string_view piece) {
    std::cout.write(piece.data(), static_cast<std::streamsize>(piece.size()));
    std::cout.flush();
    reply += piece;
  });
  std::cout << '\n';
  return reply;
}

}  // namespace

int main(int argc, char **argv) {
  Options o;
  if (!parse(argc, argv, o)) {
    std::cerr << "usage: " << argv[0]
              << " MODEL [--system TEXT] [--max-tokens N] [--threads N] [--temperature T] [--seed S]\n";
    return 2;
  }
  try {
    ember::Model model(o.model);
    ember::SessionParams sp;
    sp.n_threads = o.threads;
    ember::Session session(model, sp);
    ember::SamplerParams smp;
    smp.temperature = o.temperature;
    if (o.seed) smp.seed = std::strtoull(o.seed, nullptr, 10);
    ember::Sampler sampler(smp);
    ember::GenerateOptions options;
    options.max_tokens = o.max_tokens;

    std::vector<ember::ChatMessage> start;
    if (o.system) start.push_back({"system", o.system});
    std::vector<ember::ChatMessage> messages = start;
    std::string line;
    while (std::cerr << "> " << std::flush, std::getline(std::cin, line)) {
      if (!line.empty() && line.back() == '\r') line.pop_back();
      if (line.find_first_not_of(" \t") == std::string::npos) continue;
      messages.push_back({"user", line});
      std::string reply;
      try {
        reply = say(session, messages, sampler, options);
      } catch (const ember::Error &e) {
        if (e.status() != ember::Status::context_full) throw;
        std::cerr << "(the context is full: starting a new conversation)\n";
        ember::ChatMessage last = messages.back();
        messages = start;
        messages.push_back(last);
        reply = say(session, messages, sampler, options);
      }
      // Messages reach the C API as NUL-terminated strings: drop any NUL generated.
      reply.erase(std::remove(reply.begin(), reply.end(), '\0'), reply.end());
      messages.push_back({"assistant", reply});
    }
  } catch (const ember::Error &e) {
    std::cerr << "error: " << e.what() << '\n';
    return 1;
  }
  return 0;
}
