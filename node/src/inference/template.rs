//! Chat prompt rendering: the GGUF's own `tokenizer.chat_template` through a real
//! Jinja engine (minijinja with Python-compatible methods), or, for base models
//! that ship none, a plain "User:/Assistant:" transcript that base models continue well.

use minijinja::{context, Environment, Error as JinjaError, ErrorKind};

use super::InferenceError;

/// One chat turn, as in OpenAI's API: the protocol's type, so messages go on
/// the wire without conversion.
pub use swarm_protocol::ChatMessage;

pub struct ChatTemplate {
    env: Option<Environment<'static>>,
    bos_token: String,
    eos_token: String,
}

const TEMPLATE_NAME: &str = "chat";

impl ChatTemplate {
    /// `source` is the Jinja template; `None` selects the plain fallback.
    pub fn new(source: Option<&str>, bos_token: &str, eos_token: &str) -> Result<Self, InferenceError> {
        let env = match source {
            Some(src) if !src.trim().is_empty() => {
                let mut env = Environment::new();
                env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
                env.add_function("raise_exception", |msg: String| -> Result<String, JinjaError> {
                    Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
                });
                env.add_function("strftime_now", |_fmt: String| -> String {
                    // Only used to print today's date in some templates; a fixed
                    // neutral value keeps prompts reproducible.
                    "1 January 2026".to_string()
                });
                env.add_template_owned(TEMPLATE_NAME, src.to_string())
                    .map_err(|e| InferenceError::Template(format!("chat template does not parse: {e}")))?;
                Some(env)
            }
            _ => None,
        };
        Ok(Self {
            env,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    pub fn has_model_template(&self) -> bool {
        self.env.is_some()
    }

    /// Render the conversation, ending with the assistant's turn opened.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, InferenceError> {
        if messages.is_empty() {
            return Err(InferenceError::BadRequest("no messages".into()));
        }
        match &self.env {
            Some(env) => {
                let tmpl = env
                    .get_template(TEMPLATE_NAME)
                    .map_err(|e| InferenceError::Template(e.to_string()))?;
                tmpl.render(context! {
                    messages => minijinja::Value::from(minijinja::value::Serde(messages)),
                    add_generation_prompt => add_generation_prompt,
                    bos_token => self.bos_token.as_str(),
                    eos_token => self.eos_token.as_str(),
                    tools => minijinja::Value::from(()),
                })
                .map_err(|e| InferenceError::Template(format!("chat template failed: {e}")))
            }
            None => Ok(plain_transcript(messages, add_generation_prompt)),
        }
    }

    /// Extra stop strings the format needs (the plain transcript would otherwise
    /// let a base model write the user's next turn).
    pub fn stop_strings(&self) -> Vec<String> {
        if self.env.is_some() {
            Vec::new()
        } else {
            vec!["\nUser:".to_string(), "\n\nUser:".to_string()]
        }
    }
}

fn plain_transcript(messages: &[ChatMessage], add_generation_prompt: bool) -> String {
    let mut out = String::new();
    for m in messages {
        match m.role.as_str() {
            "system" => {
                out.push_str(m.content.trim());
                out.push_str("\n\n");
            }
            "assistant" => {
                out.push_str("Assistant: ");
                out.push_str(m.content.trim());
                out.push('\n');
            }
            _ => {
                out.push_str("User: ");
                out.push_str(m.content.trim());
                out.push('\n');
            }
        }
    }
    if add_generation_prompt {
        out.push_str("Assistant:");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn renders_chatml_with_default_system() {
        let t = ChatTemplate::new(Some(CHATML), "", "<|im_end|>").expect("template");
        let s = t
            .render(&[ChatMessage::new("user", "Hi?")], true)
            .expect("render");
        assert_eq!(
            s,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn python_methods_and_raise_exception_work() {
        let src = "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}{{ messages[0].content.strip().upper() }}";
        let t = ChatTemplate::new(Some(src), "", "").expect("template");
        assert_eq!(
            t.render(&[ChatMessage::new("user", "  hey ")], false)
                .expect("render"),
            "HEY"
        );
        let err = t
            .render(&[ChatMessage::new("system", "x")], false)
            .expect_err("must raise");
        assert!(err.to_string().contains("first must be user"), "{err}");
    }

    #[test]
    fn fallback_transcript_for_base_models() {
        let t = ChatTemplate::new(None, "<bos>", "<eos>").expect("template");
        let s = t
            .render(
                &[
                    ChatMessage::new("system", "Be brief."),
                    ChatMessage::new("user", "2+2?"),
                ],
                true,
            )
            .expect("render");
        assert_eq!(s, "Be brief.\n\nUser: 2+2?\nAssistant:");
        assert!(!t.stop_strings().is_empty());
    }

    #[test]
    fn broken_template_is_a_clear_error() {
        let err = ChatTemplate::new(Some("{% for x in %}"), "", "")
            .err()
            .expect("error");
        assert!(err.to_string().contains("chat template"), "{err}");
    }
}
