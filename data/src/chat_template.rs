//! The chat template has one source: the Jinja text [`CHAT_TEMPLATE`], which every
//! `tokenizer_config.json` we write ships for `transformers`. It is rendered here with
//! minijinja under the settings `transformers`' `apply_chat_template` uses (blocks trimmed
//! and left-stripped), so both produce the same text.

use std::ops::Range;
use std::sync::OnceLock;

use minijinja::{context, Environment};

use crate::sft::Message;
use crate::tokenizer::CHAT_TEMPLATE;
use crate::{Error, Result};

fn template() -> Result<minijinja::Template<'static, 'static>> {
    static ENV: OnceLock<std::result::Result<Environment<'static>, String>> = OnceLock::new();
    let env = ENV
        .get_or_init(|| {
            let mut env = Environment::new();
            env.set_trim_blocks(true);
            env.set_lstrip_blocks(true);
            env.add_template("chat", CHAT_TEMPLATE)
                .map_err(|e| e.to_string())?;
            Ok(env)
        })
        .as_ref()
        .map_err(|e| Error::Usage(format!("the chat template does not parse: {e}")))?;
    env.get_template("chat")
        .map_err(|e| Error::Usage(format!("chat template: {e}")))
}

/// A conversation as the template renders it; with `add_generation_prompt` it ends with
/// the header of the assistant's next reply.
pub fn render(messages: &[Message], add_generation_prompt: bool) -> Result<String> {
    template()?
        .render(context! { messages => messages, add_generation_prompt => add_generation_prompt })
        .map_err(|e| Error::Usage(format!("rendering the chat template: {e}")))
}

/// A conversation's text and the byte ranges a model learns to produce: each assistant
/// reply as the template renders it after the generation prompt (its content and closing
/// tag). Found by rendering the conversation prefix by prefix, so they follow the template.
pub fn render_with_targets(messages: &[Message]) -> Result<(String, Vec<Range<usize>>)> {
    let text = render(messages, false)?;
    let mut targets = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let before = render(&messages[..i], true)?;
        let through = render(&messages[..=i], false)?;
        if !through.starts_with(&before) || !text.starts_with(&through) {
            return Err(Error::Usage(
                "the chat template does not render a conversation as the concatenation of its turns; the assistant-only loss mask needs it to".into(),
            ));
        }
        targets.push(before.len()..through.len());
    }
    Ok((text, targets))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turn(role: &str, content: &str) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }

    #[test]
    fn replies_are_the_targets_and_the_prompt_ends_with_the_assistant_header() {
        let conversation = [
            turn("system", "Be brief."),
            turn("user", "Hi"),
            turn("assistant", "Hello!"),
            turn("user", "Bye"),
            turn("assistant", "Bye."),
        ];
        let (text, targets) = render_with_targets(&conversation).unwrap();
        assert_eq!(
            text,
            "<r0>system<r1>Be brief.</r2><r0>user<r1>Hi</r2><r0>assistant<r1>Hello!</s><r0>user<r1>Bye</r2><r0>assistant<r1>Bye.</s>"
        );
        let replies: Vec<&str> = targets.iter().map(|r| &text[r.clone()]).collect();
        assert_eq!(replies, ["Hello!</s>", "Bye.</s>"]);
        assert!(render(&conversation[..2], true)
            .unwrap()
            .ends_with("<r0>user<r1>Hi</r2><r0>assistant<r1>"));
    }
}
